"""Issue 14's targets (performance, round 2) and the before/after tables, from the benchmark's JSON.

"before" is accept-watch at an earlier commit (before.py), run in the same rounds as the current one:
modes aw-before / aw-events-before at nginx's full speed and ~10 k/s, aw-before in the pinned loopback
runs, and a second BPF-statistics run."""

from __future__ import annotations

from typing import Any

from .summaries import all_aw_runs, find_workload, long_run_flatness, rounds_used

RSS_LIMIT_MB = 90.0
ATTACH_LIMIT_S = 1.0
EVENTS_CPU_PCT = 10.0
EVENTS_LOSS = 0.05
FLOOR_MARGIN_US = 0.5
P99_LIMIT = 0.05


def _mode(results: dict[str, Any], workload: str, mode: str) -> dict[str, Any] | None:
    w = find_workload(results, workload)
    return (w or {}).get("summary", {}).get("modes", {}).get(mode)


def _loss(m: dict[str, Any] | None) -> str:
    if not m or not m.get("rps_ratio"):
        return "—"
    r = m["rps_ratio"]
    return f"{100 * (1 - r['median']):.1f} % [{100 * (1 - r['max']):.1f}, {100 * (1 - r['min']):.1f}]"


def _cpu(m: dict[str, Any] | None) -> str:
    return "—" if not m or not m.get("cpu_pct") else f"{m['cpu_pct']['median']:.1f} %"


def _p99(m: dict[str, Any] | None) -> str:
    if not m or not m.get("p99_ratio"):
        return "—"
    r = m["p99_ratio"]
    return f"{100 * (r['median'] - 1):+.1f} % [{100 * (r['min'] - 1):+.1f}, {100 * (r['max'] - 1):+.1f}]"


def _current_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in all_aw_runs(results) if not r["mode"].endswith("-before")]


def evaluate(results: dict[str, Any]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []

    def add(key: str, target: str, ok: bool | None, measured: str) -> None:
        status = "not run" if ok is None else ("met" if ok else "missed")
        out.append({"id": key, "target": target, "status": status, "measured": measured})

    ev = _mode(results, "nginx-max", "aw-events")
    if ev:
        cpu, loss = ev["cpu_pct"]["median"], 1 - ev["rps_ratio"]["median"]
        before = _mode(results, "nginx-max", "aw-events-before")
        was = f" (before: {_cpu(before)} of a core, loss {_loss(before)})" if before else ""
        add("events_cpu", f"--events at max rate: daemon ≤ {EVENTS_CPU_PCT:.0f} % of a core",
            cpu <= EVENTS_CPU_PCT, f"{_cpu(ev)} of a core (median){was}")
        add("events_loss", f"--events at max rate: throughput loss ≤ {100 * EVENTS_LOSS:.0f} %",
            loss <= EVENTS_LOSS, f"{_loss(ev)} (median [spread])")
    else:
        add("events_cpu", "--events at max rate", None, "nginx-max not in this run")
    ev_runs = [r for r in _current_runs(results) if r["mode"] == "aw-events"]
    if ev_runs:
        ok = [r for r in ev_runs
              if r["aw"]["event_lines"] + r["aw"]["lost_events"] == r["aw"]["total_accepts"]]
        lost = sum(r["aw"]["lost_events"] for r in ev_runs)
        add("events_exact", "--events: lines + lost = total", len(ok) == len(ev_runs),
            f"{len(ok)} of {len(ev_runs)} runs; {lost} lost in all")
    lb = (results.get("loopback") or {}).get("summary") or {}
    if "aw" in lb and "floor" in lb:
        aw, floor = lb["aw"]["added_us"]["median"], lb["floor"]["added_us"]["median"]
        text = f"aw {aw:+.2f} µs, floor {floor:+.2f} µs: floor {aw - floor:+.2f} µs"
        if "aw-before" in lb:
            before = lb["aw-before"]["added_us"]["median"]
            text += f" (before: {before:+.2f} µs, floor {before - floor:+.2f} µs)"
        if "aw-noinflight" in lb and "floor-noinflight" in lb:
            nf, nff = lb["aw-noinflight"]["added_us"]["median"], lb["floor-noinflight"]["added_us"]["median"]
            text += f"; --no-inflight {nf:+.2f} µs on its own floor {nff:+.2f} µs (floor {nf - nff:+.2f} µs)"
        add("floor", f"Default mode ≤ floor + {FLOOR_MARGIN_US} µs per connection (pinned loopback)",
            aw - floor <= FLOOR_MARGIN_US, text)
    aw_max = _mode(results, "nginx-max", "aw")
    if aw_max:
        before = _mode(results, "nginx-max", "aw-before")
        was = f" (before: {_p99(before)})" if before else ""
        add("p99", f"Default mode: p99 change ≤ +{100 * P99_LIMIT:.0f} % at max rate",
            aw_max["p99_ratio"]["median"] - 1 <= P99_LIMIT, f"{_p99(aw_max)}{was}")
        runs = [r for rnd in rounds_used(find_workload(results, "nginx-max") or {"rounds": []})
                for r in rnd["runs"] if r["mode"] in ("aw", "aw-events", "aw-paused")]
        exact = sum(1 for r in runs if r["counts"]["verdict"] == "exact" and r["aw"]["unattributed"] == 0)
        add("exact14", "Counts exact (nginx at max rate)", exact == len(runs) and bool(runs),
            f"{exact} of {len(runs)} runs exact")
    startup = [r["ready_s"] for r in (results.get("startup") or {}).get("runs", [])]
    ready = startup + [r["ready_s"] for r in _current_runs(results) if "ready_s" in r]
    if ready:
        add("attach14", f"Attach ≤ {ATTACH_LIMIT_S:.0f} s", max(ready) <= ATTACH_LIMIT_S,
            f"slowest {max(ready):.2f} s of {len(ready)} launches")
    rss = [r["tool_mem_mb"]["VmRSS"] for r in _current_runs(results)]
    long = results.get("long_run")
    if long:
        rss += [long["mem_end_mb"]["VmRSS"]] + [s["rss_mb"] for s in long["samples"]]
    if rss:
        anon = [r["tool_mem_mb"]["RssAnon"] for r in _current_runs(results)]
        add("rss14", f"RSS ≤ {RSS_LIMIT_MB:.0f} MB", max(rss) <= RSS_LIMIT_MB,
            f"highest VmRSS {max(rss):.1f} MB (benchmark runs and long run); of it anonymous memory at "
            f"most {max(anon):.1f} MB, the rest shared library pages")
    if long and long["target_connections"] >= 1_000_000:
        flat = long_run_flatness(long)
        add("flat14", "RSS flat over 1 M connections", flat["growth_mb"] <= 5.0,
            f"+{flat['growth_mb']:.1f} MB from {flat['from_connections']:,} to {flat['to_connections']:,}")
    add("matrix", "Kernel matrix green", None, "not part of `make bench`: see `make kernel-matrix`")
    return out


def render(add: Any, results: dict[str, Any]) -> None:
    """The issue-14 targets and the before/after comparison."""
    targets = results.get("targets_14") or []
    if not targets:
        return
    add("## Targets (issue 14: performance, round 2)")
    add("")
    add("| target | result | measured |")
    add("|---|---|---|")
    for t in targets:
        mark = {"met": "**met**", "missed": "**missed**"}.get(t["status"], t["status"])
        add(f"| {t['target']} | {mark} | {t['measured']} |")
    add("")
    if not results.get("before_commit"):
        return
    add(f"## Before and after (commit {results['before_commit']} → {results['commit']}, same rounds)")
    add("")
    others = [run["others_cpu_pct"] for w in results.get("workloads", []) for rnd in w["rounds"]
              for run in rnd["runs"]]
    if others:
        busy = sorted(others)[len(others) // 2]
        add(f"Both versions ran in the same interleaved rounds (modes `aw-before`, `aw-events-before`; "
            f"`aw-before` in the pinned loopback runs). Other processes used a median {busy:.1f} % of a "
            f"core (at most {max(others):.1f} %) during the nginx runs"
            + (": **the machine was shared and loaded**, so the nginx ratios are noisy."
               if busy > 5 else "."))
        lb_sum = (results.get("loopback") or {}).get("summary") or {}
        lb_sd = lb_sum.get("baseline", {}).get("us_per_conn", {})
        if lb_sd.get("sd", 0) > 1.0:
            add("")
            add(f"The pinned loopback runs were disturbed as well (baseline {lb_sd['median']:.1f} µs per "
                f"connection with a run-to-run standard deviation of {lb_sd['sd']:.1f} µs: other processes "
                "ran on the pinned CPU), too much to resolve differences under a µs. The sharpest "
                "before/after figure of this run is the kernel's own accounting of the programs' run time "
                "(bpf_stats rows below), which other load does not inflate as much.")
        add("")
    add("| figure | before | after |")
    add("|---|---|---|")
    for wl in ("nginx-max", "nginx-10k"):
        for mode, what in (("aw", "default"), ("aw-events", "--events")):
            a, b = _mode(results, wl, mode), _mode(results, wl, f"{mode}-before")
            if a and b:
                add(f"| {wl} {what}: throughput loss | {_loss(b)} | {_loss(a)} |")
                add(f"| {wl} {what}: p99 change | {_p99(b)} | {_p99(a)} |")
                add(f"| {wl} {what}: daemon CPU (% of a core) | {_cpu(b)} | {_cpu(a)} |")
                rss_b, rss_a = b["rss_mb"]["median"], a["rss_mb"]["median"]
                add(f"| {wl} {what}: VmRSS MB (median) | {rss_b:.1f} | {rss_a:.1f} |")
                add(f"| {wl} {what}: RssAnon MB (median; VmRSS also counts library pages other processes "
                    f"map) | {b['anon_mb']['median']:.1f} | {a['anon_mb']['median']:.1f} |")
    lb = (results.get("loopback") or {}).get("summary") or {}
    if "aw" in lb and "aw-before" in lb:
        add(f"| pinned loopback: added µs per connection | {lb['aw-before']['added_us']['median']:+.2f} | "
            f"{lb['aw']['added_us']['median']:+.2f} |")
    bs, bsb = results.get("bpf_stats") or {}, results.get("bpf_stats_before") or {}
    if "total_ns_per_connection" in bs and "total_ns_per_connection" in bsb:
        add(f"| BPF run time per connection (bpf_stats, nginx max) | {bsb['total_ns_per_connection']:,} ns | "
            f"{bs['total_ns_per_connection']:,} ns |")
        names = {p["name"] for p in bs["programs"] + bsb["programs"]}
        for name in sorted(names):
            b = next((p for p in bsb["programs"] if p["name"] == name), None)
            a = next((p for p in bs["programs"] if p["name"] == name), None)

            def cell(p: dict[str, Any] | None) -> str:
                if p is None:
                    return "not attached"
                if p["ns_per_call"] is None:
                    return f"{p['ns_per_connection']} ns"
                return f"{p['ns_per_connection']} ns ({p['ns_per_call']} ns × {p['calls_per_connection']})"
            add(f"| `{name}` per connection | {cell(b)} | {cell(a)} |")
    add("")
