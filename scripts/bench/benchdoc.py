"""Summaries, target verdicts and docs/benchmarks.md, all computed from the benchmark's JSON (so the
markdown can be re-rendered from a stored run: scripts/bench.py --render-only docs/benchmarks.json)."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from modes import AW_MODES, LOOPBACK_LABELS, MODE_TEXT
from tools import BPFTRACE_PROGRAM

RSS_LIMIT_MB = 150.0
FLAT_TOLERANCE_MB = 5.0  # RSS growth allowed between 100 k connections and the end of the long run


# --------------------------------------------------------------------------------- statistics


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _rounds_used(workload: dict[str, Any]) -> list[dict[str, Any]]:
    clean = [r for r in workload["rounds"] if not r["disturbed"]]
    return clean or workload["rounds"]


def summarize_workload(workload: dict[str, Any], modes: tuple[str, ...]) -> dict[str, Any]:
    """Per mode: medians and spreads, each ratio taken against the baseline of the same round."""
    rounds = _rounds_used(workload)
    out: dict[str, Any] = {"rounds_used": len(rounds), "rounds_run": len(workload["rounds"]), "modes": {}}
    for mode in modes:
        rps, p99, rps_ratio, p99_ratio = [], [], [], []
        cpu, rss, hwm, anon, ready, others = [], [], [], [], [], []
        lost = 0
        errors = 0
        verdicts: Counter[str] = Counter()
        accept_rate = []
        unlogged = []
        for rnd in rounds:
            by_mode = {run["mode"]: run for run in rnd["runs"]}
            run, base = by_mode[mode], by_mode["baseline"]
            rps.append(run["wrk"]["rps"])
            p99.append(run["wrk"]["latency_us"]["p99"] / 1000)
            rps_ratio.append(run["wrk"]["rps"] / base["wrk"]["rps"])
            p99_ratio.append(run["wrk"]["latency_us"]["p99"] / base["wrk"]["latency_us"]["p99"])
            errors += sum(run["wrk"]["errors"].values())
            others.append(run["others_cpu_pct"])
            if run["server"]["accept_rate"] is not None:
                accept_rate.append(run["server"]["accept_rate"])
            if run["counts"].get("unlogged") is not None:
                unlogged.append(run["counts"]["unlogged"])
            if "tool_cpu_pct" in run:
                cpu.append(run["tool_cpu_pct"])
            if "tool_mem_mb" in run:
                rss.append(run["tool_mem_mb"]["VmRSS"])
                hwm.append(run["tool_mem_mb"]["VmHWM"])
                anon.append(run["tool_mem_mb"]["RssAnon"])
            if "ready_s" in run:
                ready.append(run["ready_s"])
            if "aw" in run:
                lost += run["aw"]["lost_events"]
            if "bpftrace" in run:
                lost += run["bpftrace"]["lost_events"]
            if "verdict" in run["counts"]:
                verdicts[run["counts"]["verdict"]] += 1
        out["modes"][mode] = {
            "rps": spread(rps),
            "rps_ratio": spread(rps_ratio),
            "p99_ms": spread(p99),
            "p99_ratio": spread(p99_ratio),
            "cpu_pct": spread(cpu),
            "rss_mb": spread(rss),
            "hwm_mb": spread(hwm),
            "anon_mb": spread(anon),
            "ready_s": spread(ready),
            "accept_rate": spread(accept_rate),
            "unlogged": spread(unlogged),
            "lost_events": lost,
            "wrk_errors": errors,
            "verdicts": dict(verdicts),
            "others_cpu_pct_max": max(others) if others else None,
        }
    base_rps = [
        by["wrk"]["rps"] for by in ({run["mode"]: run for run in rnd["runs"]}["baseline"] for rnd in rounds)
    ]
    if len(base_rps) > 1:
        out["baseline_cv"] = statistics.stdev(base_rps) / statistics.mean(base_rps)
    return out


def summarize_py_spy(path: Path, rate_hz: int, seconds: float, top: int = 12) -> dict[str, Any]:
    """py-spy raw output ("frame;frame;... count" per stack, idle excluded) -> where the daemon's
    CPU goes: inclusive share of each function, and the busy fraction of one core."""
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.strip() for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        self_[frames[-1]] += n
    interesting = [
        (f, n)
        for f, n in inclusive.most_common()
        if any(k in f for k in ("daemon/", "probes/", "dashboard/", "bcc/"))
        and not f.startswith(("main (", "run_watch (", "_run ("))
    ]
    return {
        "samples": total,
        "busy_pct_of_core": round(100.0 * total / max(1.0, rate_hz * seconds), 1),
        "top_inclusive": [
            {"frame": f, "pct": round(100.0 * n / max(1, total), 1)} for f, n in interesting[:top]
        ],
        "top_self": [
            {"frame": f, "pct": round(100.0 * n / max(1, total), 1)} for f, n in self_.most_common(8)
        ],
    }


# ------------------------------------------------------------------------------------- targets


def _workload(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((w for w in results.get("workloads", []) if w["name"] == name), None)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _all_aw_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        run
        for w in results.get("workloads", [])
        for rnd in _rounds_used(w)
        for run in rnd["runs"]
        if run["mode"] in AW_MODES
    ]


def cost_estimate(results: dict[str, Any]) -> dict[str, float] | None:
    """accept-watch's share of the machine's CPU at nginx's full speed, from accounting rather than
    throughput: the BPF programs' run time (bpf_stats run) and the daemon's CPU (median of the `aw`
    runs), each divided by the cores that client and server saturate. The BPF figure includes the
    statistics' own clock reads and leaves out the hooks' dispatch: it is an estimate, not a bound."""
    wmax = _workload(results, "nginx-max")
    bs = results.get("bpf_stats") or {}
    if not wmax or "total_pct_of_core" not in bs:
        return None
    ncpu = results["machine"]["nproc"] or 1
    bpf = bs["total_pct_of_core"] / ncpu
    daemon = wmax["summary"]["modes"]["aw"]["cpu_pct"]["median"] / ncpu
    return {"bpf_pct_of_machine": round(bpf, 2), "daemon_pct_of_machine": round(daemon, 2),
            "total_pct_of_machine": round(bpf + daemon, 2)}


def loopback_projection(results: dict[str, Any]) -> dict[str, float] | None:
    """The pinned loopback figures carried over to nginx at full speed. There client and server
    saturate every core, so each connection costs ncpu × 1e6 / rps µs of CPU; a tool that adds a µs
    of CPU per connection lowers throughput by a / (c + a). The added µs come from the loopback runs
    (they include the hooks' dispatch and the syscall-tracing path, which bpf_stats leaves out); the
    daemon's share from the nginx `aw` runs. An estimate: nginx and wrk make other system calls per
    connection than connbench."""
    lb = (results.get("loopback") or {}).get("summary")
    wmax = _workload(results, "nginx-max")
    if not lb or not wmax or "aw" not in lb:
        return None
    ncpu = results["machine"]["nproc"] or 1
    base_rps = wmax["summary"]["modes"]["baseline"]["rps"]["median"]
    per_conn = ncpu * 1e6 / base_rps

    def loss(added: float) -> float:
        return 100.0 * added / (per_conn + added)

    aw = lb["aw"]["added_us"]["median"]
    floor = lb["floor"]["added_us"]["median"] if "floor" in lb else None
    daemon = wmax["summary"]["modes"]["aw"]["cpu_pct"]["median"] / ncpu
    out = {
        "nginx_us_per_conn": round(per_conn, 2),
        "aw_added_us": aw,
        "aw_pct": round(loss(aw), 2),
        "daemon_pct": round(daemon, 2),
        "total_pct": round(loss(aw) + daemon, 2),
    }
    if floor is not None:
        out.update(floor_added_us=floor, floor_pct=round(loss(floor), 2))
    return out


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's targets, each met / missed / not run, with the measured figure."""
    out: list[dict[str, str]] = []

    def add(key: str, target: str, status: str, measured: str) -> None:
        out.append({"id": key, "target": target, "status": status, "measured": measured})

    wmax = _workload(results, "nginx-max")
    if wmax:
        m = wmax["summary"]["modes"]
        loss = 1 - m["aw"]["rps_ratio"]["median"]
        bt_loss = 1 - m["bpftrace"]["rps_ratio"]["median"]
        spread = m["aw"]["rps_ratio"]
        measured = (
            f"{_pct(loss)} (median of {spread['n']} rounds, spread {_pct(1 - spread['max'])} to "
            f"{_pct(1 - spread['min'])}; accept-watch default mode)"
        )
        # The paired rounds cannot resolve 1 % when the baseline itself varies by several %: the
        # kernel's accounting of the programs' run time plus the daemon's CPU, as a share of the
        # machine, is the sharper estimate. Both must be within the target.
        estimate = cost_estimate(results)
        projection = loopback_projection(results)
        ok = (
            loss <= 0.01
            and (estimate is None or estimate["total_pct_of_machine"] <= 1.0)
            and (projection is None or projection["total_pct"] <= 1.0)
        )
        if estimate is not None:
            total, bpf, daemon = (estimate[k] for k in
                                  ("total_pct_of_machine", "bpf_pct_of_machine", "daemon_pct_of_machine"))
            measured += (
                f"; estimated from CPU accounting: {total:.1f} % of the machine "
                f"(BPF programs {bpf:.1f} %, daemon {daemon:.1f} %)"
            )
        if projection is not None:
            measured += (
                f"; from the pinned loopback runs: {projection['total_pct']:.1f} % "
                f"(BPF {projection['aw_pct']:.1f} %: +{projection['aw_added_us']:.2f} µs per connection "
                f"on nginx's {projection['nginx_us_per_conn']:.0f} µs; "
                f"daemon {projection['daemon_pct']:.1f} %)"
            )
            if "floor_pct" in projection:
                measured += (
                    f"; empty programs on the same hooks alone: {projection['floor_pct']:.1f} % "
                    f"(+{projection['floor_added_us']:.2f} µs)"
                )
        add("throughput", "Throughput loss ≤ 1 % at the VM's max accept rate (nginx)",
            "met" if ok else "missed", measured)
        add(
            "vs_bpftrace",
            "… and lower than the bpftrace one-liner's",
            "met" if loss < bt_loss else "missed",
            f"accept-watch {_pct(loss)} vs bpftrace {_pct(bt_loss)}",
        )
        runs = [run for rnd in _rounds_used(wmax) for run in rnd["runs"] if run["mode"] in AW_MODES]
        exact = sum(1 for r in runs if r["counts"]["verdict"] == "exact" and r["aw"]["unattributed"] == 0)
        add(
            "exact",
            "Counts exact at max rate (per worker = access log; total = nginx's accepts)",
            "met" if exact == len(runs) and runs else "missed",
            f"{exact} of {len(runs)} accept-watch runs exact, unattributed "
            f"{sum(r['aw']['unattributed'] for r in runs)}",
        )
    else:
        add(
            "throughput",
            "Throughput loss ≤ 1 % at the VM's max accept rate",
            "not run",
            "nginx-max not in this run",
        )
    ev_runs = [r for r in _all_aw_runs(results) if r["mode"] == "aw-events"]
    if ev_runs:
        accounted = [
            r for r in ev_runs if r["aw"]["event_lines"] + r["aw"]["lost_events"] == r["aw"]["total_accepts"]
        ]
        lost = sum(r["aw"]["lost_events"] for r in ev_runs)
        add(
            "losses",
            "Per-connection losses, if any, counted and reported",
            "met" if len(accounted) == len(ev_runs) else "missed",
            f"{len(accounted)} of {len(ev_runs)} --events runs: lines + lost_events = total_accepts; "
            f"{lost} lost in all",
        )
    w10 = _workload(results, "nginx-10k")
    if w10:
        c = w10["summary"]["modes"]["aw"]["cpu_pct"]
        rate = w10["summary"]["modes"]["aw"]["rps"]["median"]
        add(
            "cpu10k",
            "accept-watch ≤ 10 % of one core at 10 k accepts/s",
            "met" if c["median"] <= 10 else "missed",
            f"{c['median']:.1f} % (median; {c['min']:.1f}–{c['max']:.1f}) at {rate:.0f} conn/s",
        )
    rss_runs = _all_aw_runs(results)
    long = results.get("long_run")
    rss_values = [r["tool_mem_mb"]["VmRSS"] for r in rss_runs]
    if long:
        rss_values += [long["mem_end_mb"]["VmRSS"]] + [s["rss_mb"] for s in long["samples"]]
    if rss_values:
        peak = max(rss_values)
        add(
            "rss",
            f"RSS ≤ {RSS_LIMIT_MB:.0f} MB",
            "met" if peak <= RSS_LIMIT_MB else "missed",
            f"highest VmRSS {peak:.0f} MB (benchmark runs and long run)",
        )
    if long:
        flat = long_run_flatness(long)
        if long["target_connections"] >= 1_000_000:
            add(
                "flat",
                "RSS flat after 1 M connections",
                "met" if flat["growth_mb"] <= FLAT_TOLERANCE_MB else "missed",
                f"{flat['from_mb']:.1f} MB after {flat['from_connections']:,} connections → "
                f"{flat['to_mb']:.1f} MB after {flat['to_connections']:,} "
                f"(+{flat['growth_mb']:.1f} MB; tolerance {FLAT_TOLERANCE_MB:.0f} MB)",
            )
        else:
            add(
                "flat",
                "RSS flat after 1 M connections",
                "not run",
                f"long run was {long['target_connections']:,} connections",
            )
    startup = results.get("startup", {}).get("runs", [])
    ready_all = [r["ready_s"] for r in startup] + [r["ready_s"] for r in rss_runs if "ready_s" in r]
    if ready_all:
        worst = max(ready_all)
        add(
            "attach",
            "Attach ≤ 3 s after launch",
            "met" if worst <= 3.0 else "missed",
            f"slowest {worst:.2f} s of {len(ready_all)} launches "
            "(cold/warm startup runs and every benchmark run)",
        )
    return out


def long_run_flatness(long: dict[str, Any]) -> dict[str, Any]:
    samples = long["samples"]
    first = next((s for s in samples if s["connections"] >= 100_000), samples[0])
    last = samples[-1]
    return {
        "from_mb": first["rss_mb"],
        "from_connections": first["connections"],
        "to_mb": last["rss_mb"],
        "to_connections": last["connections"],
        "growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
    }


# ------------------------------------------------------------------------------------ markdown


def _ms(v: float) -> str:
    return f"{v:.2f}"


def _ratio_cell(s: dict[str, float] | None, invert: bool = False) -> str:
    """A ratio to the baseline as a signed % change: median [min, max]."""
    if s is None:
        return "—"

    def f(x: float) -> str:
        return f"{100 * (x - 1):+.1f}"

    return f"{f(s['median'])} % [{f(s['min'])}, {f(s['max'])}]"


def _med(s: dict[str, float] | None, fmt: str = "{:.1f}") -> str:
    return "—" if s is None else fmt.format(s["median"])


def _verdicts(v: dict[str, int]) -> str:
    if not v:
        return "—"
    return ", ".join(f"{k} {n}" for k, n in sorted(v.items()))


def render_markdown(results: dict[str, Any]) -> str:
    L: list[str] = []
    add = L.append
    m = results["machine"]
    add("# Benchmarks")
    add("")
    add(
        f"Written by `{results['command']}` on {results['generated_at']} (commit {results['commit']}), "
        f"in {results.get('elapsed_s', 0) / 60:.1f} min. Raw numbers of every run: "
        "[benchmarks.json](benchmarks.json)."
    )
    if results["settings"].get("quick"):
        add("")
        add("**This is a `--quick` smoke run (1 round, short runs): not a measurement.**")
    add("")
    add("## Machine")
    add("")
    probes = sorted({r["aw"]["probe"] for r in _all_aw_runs(results) if "aw" in r})
    lb = results["load_before"]
    add("| | |")
    add("|---|---|")
    add(f"| CPU | {m['nproc']} × {m['cpu_model']} (client and server share them) |")
    add(f"| memory | {m['memory_gib']} GiB |")
    add(f"| kernel | {m['kernel']} ({m['os']}) |")
    add(
        f"| probe used | {', '.join(probes) or '—'} "
        "(fentry/fexit and kprobes are not available on this kernel) |"
    )
    for k, v in results["versions"].items():
        add(f"| {k} | {v} |")
    add(
        f"| load average before | {' '.join(f'{x:.2f}' for x in lb['loadavg'])}; "
        f"{lb['quiet_check']['busy_cores']:.2f} cores busy when the benchmark began |"
    )
    others = [
        run["others_cpu_pct"]
        for w in results.get("workloads", [])
        for rnd in w["rounds"]
        for run in rnd["runs"]
    ]
    if others:
        add(
            f"| other processes during runs | at most {max(others):.1f} % of a core "
            f"(median {statistics.median(others):.1f} %); "
            f"rounds over {results['settings']['disturbed_pct']:.0f} % "
            "are repeated and left out |"
        )
    add("")
    add("## Targets (issue 5)")
    add("")
    add("| target | result | measured |")
    add("|---|---|---|")
    for t in results.get("targets", []):
        mark = {"met": "**met**", "missed": "**missed**"}.get(t["status"], t["status"])
        add(f"| {t['target']} | {mark} | {t['measured']} |")
    add("")
    import issue14  # imports this module: not at the top

    issue14.render(add, results)
    _method(add, results)
    for w in results.get("workloads", []):
        _workload_section(add, w)
    _startup_section(add, results.get("startup"))
    if results.get("long_run"):
        _long_section(add, results["long_run"])
    if results.get("profile"):
        _profile_section(add, results["profile"])
    if results.get("bpf_stats"):
        _bpf_section(add, results["bpf_stats"])
    if results.get("loopback"):
        _loopback_section(add, results["loopback"], loopback_projection(results))
    _limits_section(add, results)
    _all_runs(add, results)
    return "\n".join(L) + "\n"


def _method(add: Any, results: dict[str, Any]) -> None:
    s = results["settings"]
    add("## How it is measured")
    add("")
    add(
        f"- Load: `wrk -t1 -c{s['connections']} -d{s['duration_s']:g}s --latency -H 'Connection: close'` on "
        "127.0.0.1, so every request is a new connection (one `accept()` each). Full speed has no pacing; "
        "the fixed rates pace each connection with wrk's Lua `delay()` (calibrated once without any tool; "
        "the rate reached in each run is in the tables)."
    )
    add(
        "- Servers: Debian's nginx with 2 workers, `accept_mutex off`, `return 200` (own config in a "
        "temporary directory: `scripts/bench/nginx.conf.in`); gunicorn with 8 sync workers serving "
        "`demo/app.py` with no sleep."
    )
    add(
        f"- Modes, in every round, in an order rotated from round to round: {', '.join(s['modes'])}. "
        f"nginx at full speed runs {s['max_rate_rounds']} rounds, the others {s['rounds']}. Each figure is "
        "the median over rounds, `[min, max]` the spread; changes are ratios to the baseline **of the same "
        "round**, so slow drifts of the VM cancel out."
    )
    if s.get("diagnostic_mode"):
        add(
            f"- nginx at full speed also runs `{s['diagnostic_mode']}`: accept-watch attached as in `aw`, "
            "but "
            "its daemon is stopped (SIGSTOP) from just before the load until nginx is drained, then resumed "
            "and interrupted. Only the BPF programs run, so this separates their cost (inside nginx's and "
            "wrk's system calls) from the daemon's CPU. Counts stay exact: the programs count into maps."
        )
    add(
        "- accept-watch runs as installed (`accept-watch --pid <master> --export F --listen 127.0.0.1:P`: "
        "counters only, dashboard on) with a client fetching `/api/snapshot` once a second; `aw-events` adds "
        "`--events FILE`. bpftrace runs `" + _bpftrace_cmd() + "`."
    )
    add(
        "- A tool is started and waited for (its `attached` line; for bpftrace a `BEGIN` probe that "
        "prints a marker once all probes are attached), "
        f"then {s['settle_s']:g} s, "
        "then the load. The window is clean: wrk stops, nginx finishes every connection (stub_status "
        "`Active` back to 1; for gunicorn `ss` shows none open), the server's counters are read, and only "
        "then is the tool interrupted (SIGINT) and its export read."
    )
    add(
        "- Throughput = wrk's completed requests/s. Latency = wrk's p99, from writing the request to the "
        "end of the response (wrk does not time the connect, so accept-queue time is not in it)."
    )
    add(
        "- accept-watch CPU = user+sys from `/proc/PID/stat` over the load, its own and its waited-for "
        "children's (a command it runs), in % of one core. This is the daemon only: the BPF programs run "
        "inside the server's and the client's system calls, and their cost shows up as throughput loss. "
        "RSS = `VmRSS` at the end of the load (peak = `VmHWM`; after compiling, accept-watch releases the "
        "LLVM/clang libraries' pages, which it never uses again)."
    )
    add(
        "- Counts: per worker against the access log (one line per request with `$pid`), total against "
        "nginx's stub_status `accepts` (every accepted connection, read over a unix socket that accept-watch "
        "does not watch). A connection wrk opened but closed without sending a request when it stopped is "
        "accepted (and counted) but never logged: per worker accept-watch ≥ log, and the sum of the "
        "differences must equal nginx's accepts minus log lines (`unlogged`). gunicorn has no accept "
        "counter: there the difference must be ≥ 0 and ≤ the 64 connections in flight (`consistent`)."
    )
    add(
        f"- Before each run the VM must be idle (≤ {s['quiet_cores']} cores busy, else wait); CPU used by "
        "other processes during the run is recorded."
    )
    add("")


def _bpftrace_cmd() -> str:
    return f"bpftrace -e '{BPFTRACE_PROGRAM}' > FILE"


def _workload_section(add: Any, w: dict[str, Any]) -> None:
    s = w["summary"]
    load = w["load"]
    add(f"## {w['title']}")
    add("")
    pace = "" if load["delay_ms"] is None else f", delay {load['delay_ms']:.2f} ms per connection"
    cv = f"; baseline run-to-run spread (CV) {100 * s['baseline_cv']:.1f} %" if "baseline_cv" in s else ""
    add(f"{s['rounds_used']} rounds used ({s['rounds_run']} run){pace}{cv}.")
    add("")
    add(
        "| mode | conn/s | throughput vs baseline | p99 ms | p99 vs baseline | tool CPU % of a core | "
        "tool RSS MB (peak) | events lost | counts |"
    )
    add("|---|---|---|---|---|---|---|---|---|")
    for mode, ms in s["modes"].items():
        base = mode == "baseline"
        rss = "—" if ms["rss_mb"] is None else f"{ms['rss_mb']['median']:.0f} ({ms['hwm_mb']['max']:.0f})"
        cpu = (
            "—"
            if ms["cpu_pct"] is None
            else (f"{ms['cpu_pct']['median']:.1f} [{ms['cpu_pct']['min']:.1f}, {ms['cpu_pct']['max']:.1f}]")
        )
        lost = "—" if base else str(ms["lost_events"])
        counts = _verdicts(ms["verdicts"])
        if base and ms["unlogged"] is not None:
            counts = f"unlogged {ms['unlogged']['min']:.0f}–{ms['unlogged']['max']:.0f}"
        add(
            f"| {MODE_TEXT[mode]} | {_med(ms['rps'], '{:.0f}')} | "
            f"{'—' if base else _ratio_cell(ms['rps_ratio'])} | "
            f"{_med(ms['p99_ms'], '{:.2f}')} | {'—' if base else _ratio_cell(ms['p99_ratio'])} | "
            f"{cpu} | {rss} | "
            f"{lost} | {counts} |"
        )
    if "aw-paused" in s["modes"]:
        add("")
        add(
            f"p99 change with the daemon stopped during the load (`aw-paused`): "
            f"{_ratio_cell(s['modes']['aw-paused']['p99_ratio'])}; with it running (`aw`): "
            f"{_ratio_cell(s['modes']['aw']['p99_ratio'])}."
        )
    errs = {mode: ms["wrk_errors"] for mode, ms in s["modes"].items() if ms["wrk_errors"]}
    if errs:
        add("")
        add(f"wrk socket errors: {', '.join(f'{k} {v}' for k, v in errs.items())}.")
    add("")
    # Per-run count detail for the accept-watch and bpftrace runs.
    add("<details><summary>counts per run</summary>")
    add("")
    add("| run | tool total | server accepts | log lines | per worker: tool − log |")
    add("|---|---|---|---|---|")
    for rnd in w["rounds"]:
        for run in rnd["runs"]:
            c = run["counts"]
            if "verdict" not in c:
                continue
            diffs = ", ".join(
                f"{r['pid']}: {r['tool']}−{r['log']}={r['diff']}"
                for r in c["per_pid"]
                if r["tool"] or r["log"]
            )
            extra = f" (+{c['extra_expected']} stub_status queries)" if c["extra_expected"] else ""
            acc = "—" if c["server_accepts"] is None else f"{c['server_accepts']}{extra}"
            flag = " (disturbed round)" if rnd["disturbed"] else ""
            add(
                f"| {run['label']}{flag} | {c['tool_total']} | {acc} | {c['log_lines']} | "
                f"{diffs} → {c['verdict']} |"
            )
    add("")
    add("</details>")
    add("")


def _startup_section(add: Any, startup: dict[str, Any] | None) -> None:
    if not startup:
        return
    add("## Startup: launch → probes attached")
    add("")
    add(
        "`accept-watch --pid <nginx master> --no-dashboard --quiet`, timed from the launch to its "
        "`probe … attached` line (Python start, discovery, BTF layout, BCC compile, attach). Cold = "
        "no kernel-layout cache (a private `XDG_CACHE_HOME`, emptied); warm = the cache from the run "
        "before. BCC compiles the program at every launch either way."
    )
    add("")
    add("| run | launch → attached s | BCC compile s | attach s | TIME_WAIT sockets |")
    add("|---|---|---|---|---|")
    for i, r in enumerate(startup["runs"], 1):
        add(
            f"| {r['kind']} {i} | {r['ready_s']:.2f} | {r['compile_s']} | {r['attach_s']} | "
            f"{r['time_wait']} |"
        )
    add("")


def _long_section(add: Any, long: dict[str, Any]) -> None:
    flat = long_run_flatness(long)
    c = long["counts"]
    add(f"## Long run: {c['server_accepts']:,} connections through accept-watch")
    add("")
    add(
        f"nginx at full speed, accept-watch as installed (counters only, dashboard polled 1/s), until nginx "
        f"had accepted {long['target_connections']:,} connections: {long['wrk']['rps']:.0f} conn/s for "
        f"{long['wrk']['duration_s']:.0f} s, accept-watch at {long['tool_cpu_pct']:.1f} % of a core."
    )
    add("")
    s, e = long["mem_start_mb"], long["mem_end_mb"]
    add("| | VmRSS MB | RssAnon MB | RssFile MB | VmHWM MB |")
    add("|---|---|---|---|---|")
    add(f"| attached, before the load | {s['VmRSS']} | {s['RssAnon']} | {s['RssFile']} | {s['VmHWM']} |")
    add(f"| after {flat['from_connections']:,} connections | {flat['from_mb']} | | | |")
    add(
        f"| end ({flat['to_connections']:,} connections) | {e['VmRSS']} | {e['RssAnon']} | "
        f"{e['RssFile']} | {e['VmHWM']} |"
    )
    add("")
    samples = long["samples"]
    step = max(1, len(samples) // 10)
    add(
        "RSS over the run (MB): "
        + ", ".join(f"{s_['connections'] // 1000} k: {s_['rss_mb']}" for s_ in samples[::step])
        + "."
    )
    add("")
    if long.get("rss_by_mapping"):
        add(
            "RSS by mapping at the end (`/proc/PID/smaps`; MB, anonymous part in brackets): "
            + ", ".join(
                f"`{m['mapping']}` {m['rss_mb']:.1f} ({m['anon_mb']:.1f})" for m in long["rss_by_mapping"]
            )
            + "."
        )
        add("")
    per = ", ".join(f"{r['pid']}: {r['tool']} vs {r['log']}" for r in c["per_pid"] if r["tool"] or r["log"])
    add(
        f"Counts: accept-watch {c['tool_total']:,}, nginx accepts {c['server_accepts']:,}, access log "
        f"{c['log_lines']:,} (per worker, accept-watch vs log: {per}) → **{c['verdict']}**; "
        f"unattributed {long['aw']['unattributed']}, lost events {long['aw']['lost_events']}."
    )
    add("")


def _section_head(add: Any, title: str, run: dict[str, Any]) -> bool:
    """The section's title; False (after saying why) when its run was skipped."""
    add(f"## {title}")
    add("")
    if "skipped" in run:
        add(run["skipped"])
        add("")
        return False
    return True


def _profile_section(add: Any, prof_run: dict[str, Any]) -> None:
    if not _section_head(add, "Where accept-watch's CPU goes (py-spy, ~10 k connections/s)", prof_run):
        return
    p = prof_run["profile"]
    add(
        f"One extra `aw` run (not in the tables) at {prof_run['wrk']['rps']:.0f} conn/s, sampled with "
        f"`py-spy record --nonblocking -r 100`: {p['samples']} samples of busy threads (the daemon used "
        f"{prof_run['tool_cpu_pct']:.1f} % of a core by /proc in this run); "
        f"{prof_run['time_wait_start']:,} sockets in TIME_WAIT at the start. "
        "Inclusive share of the busy samples:"
    )
    add("")
    add("| function (file) | % of busy samples |")
    add("|---|---|")
    for f in p["top_inclusive"]:
        add(f"| `{f['frame']}` | {f['pct']:.1f} |")
    add("")


def _bpf_section(add: Any, bs: dict[str, Any]) -> None:
    if not _section_head(add, "Where the in-kernel cost goes (BPF run time, nginx at full speed)", bs):
        return
    add(
        f"One extra `aw` run (not in the tables) with `kernel.bpf_stats_enabled=1` during the load "
        f"(restored afterwards): {bs['connections']:,} connections at {bs['rps']:.0f} conn/s; run time and "
        f"call count of each of accept-watch's BPF programs from `bpftool prog show`. In all "
        f"{bs['total_pct_of_core']:.1f} % of one core, {bs['total_ns_per_connection']:,} ns per connection "
        "(the statistics add two clock reads per call)."
    )
    add("")
    add("| program | calls per connection | ns per call | ns per connection | % of one core |")
    add("|---|---|---|---|---|")
    for p in bs["programs"]:
        ns = "—" if p["ns_per_call"] is None else str(p["ns_per_call"])
        add(
            f"| `{p['name']}` | {p['calls_per_connection']} | {ns} | {p['ns_per_connection']} | "
            f"{p['pct_of_core']:.2f} |"
        )
    add("")


def _loopback_section(add: Any, lb: dict[str, Any], projection: dict[str, float] | None) -> None:
    if not _section_head(add, "Pinned loopback: CPU per connection", lb):
        return
    sm = lb["summary"]
    n_rounds = len(lb["rounds"])
    add(
        f"`scripts/bench/micro/connbench.c`: one server and one client process make "
        f"{lb['connections_per_run']:,} loopback connections (connect, request, response, server "
        "closes, client resets), both pinned to CPU 0, which does nothing else; the tool runs pinned "
        "to CPU 1. What CPU 0 pays per connection is then the BPF programs inside the server's and "
        "client's system calls and softirqs (and whatever the tool's activity on the other vCPU costs "
        "it, as on a real server). Wall time per connection, median of "
        f"{n_rounds} paired rounds (order rotated), `[min, max]` of the paired differences. "
        "`floor`: empty programs on the same hooks (`scripts/bench/micro/floor.py`): what being called "
        "at all costs (tracepoint dispatch, and every system call of the machine taking the "
        "syscall-tracing path once a syscall tracepoint is on)."
    )
    add("")
    add("| mode | µs per connection | added µs per connection | throughput loss here |")
    add("|---|---|---|---|")
    for mode, label in LOOPBACK_LABELS.items():
        if mode not in sm:
            continue
        f = sm[mode]
        added = f["added_us"]
        cell = "—" if mode == "baseline" else (
            f"{added['median']:+.2f} [{added['min']:+.2f}, {added['max']:+.2f}]")
        loss = "—" if mode == "baseline" else f"{100 * f['loss']['median']:.1f} %"
        add(f"| {label} | {f['us_per_conn']['median']:.2f} | {cell} | {loss} |")
    add("")
    sds = ", ".join(f"{mode} {sm[mode]['us_per_conn']['sd']:.2f}" for mode in LOOPBACK_LABELS if mode in sm)
    add(
        f"Run-to-run standard deviation of µs per connection: {sds} (attached tools vary more than "
        "the baseline). accept-watch counted every connection (count = connections made, none "
        f"unattributed) in {sm['aw_exact']} of {sm['aw_runs']} runs."
    )
    if projection is not None:
        add("")
        floor = (
            f" The empty programs alone would cost {projection['floor_pct']:.1f} %."
            if "floor_pct" in projection else ""
        )
        add(
            f"Carried over to nginx at full speed, where each connection costs "
            f"{projection['nginx_us_per_conn']:.1f} µs of CPU (2 saturated cores / baseline rate): "
            f"accept-watch's BPF programs {projection['aw_pct']:.1f} %, its daemon "
            f"{projection['daemon_pct']:.1f} %, together {projection['total_pct']:.1f} %.{floor}"
        )
    add("")


def _limits_section(add: Any, results: dict[str, Any]) -> None:
    """For each missed target, the measured figures that say what limits it (nothing hand-written)."""
    missed = [t for t in results.get("targets", []) if t["status"] == "missed"]
    add("## What limits the missed targets")
    add("")
    if not missed:
        add("No target was missed.")
        add("")
        return
    ncpu = results["machine"]["nproc"] or 1
    wmax = _workload(results, "nginx-max")
    prof = (results.get("profile") or {}).get("profile")
    for t in missed:
        add(f"- **{t['target']}** — {t['measured']}.")
        if t["id"] in ("throughput", "vs_bpftrace") and wmax:
            m = wmax["summary"]["modes"]
            loss = 1 - m["aw"]["rps_ratio"]["median"]
            cpu = m["aw"]["cpu_pct"]["median"]
            cv = wmax["summary"].get("baseline_cv")
            if cv is not None:
                add(
                    f"  - The baseline alone varies by {100 * cv:.1f} % (CV) from run to run, so paired "
                    "rounds cannot tell a 1 % loss from none; the CPU accounting below is the sharper figure."
                )
            add(
                f"  - The daemon used {cpu:.1f} % of a core at full speed, i.e. {cpu / ncpu:.1f} % of the "
                f"{ncpu} cores that client and server saturate."
            )
            if "aw-paused" in m:
                paused = 1 - m["aw-paused"]["rps_ratio"]["median"]
                rest = (
                    f"the remaining {100 * (loss - paused):.1f} points come with the daemon running"
                    if loss > paused
                    else "with the daemon running the loss is no larger (within the spread)"
                )
                add(
                    f"  - With the daemon stopped (`aw-paused`) the loss is {_pct(paused)}: the cost of the "
                    f"BPF programs alone; {rest}."
                )
            bs = results.get("bpf_stats")
            if bs and "programs" in bs:
                top = [p for p in bs["programs"] if p["calls_per_connection"] >= 0.1][:3]
                add(
                    f"  - The kernel's own accounting of those programs (section above): "
                    f"{bs['total_pct_of_core']:.1f} % of a core at {bs['rps']:.0f} conn/s, i.e. "
                    f"{bs['total_pct_of_core'] / ncpu:.1f} % of the machine; "
                    + "; ".join(
                        f"`{p['name']}` {p['ns_per_call']} ns × {p['calls_per_connection']} per connection"
                        for p in top
                    )
                    + ". The syscall tracepoints also put every system call of every process on the "
                    "kernel's syscall-tracing path, a cost not in these figures."
                )
            proj = loopback_projection(results)
            if proj and "floor_pct" in proj:
                work = proj["aw_added_us"] - proj["floor_added_us"]
                add(
                    f"  - The floor (pinned loopback section): empty programs on the same hooks add "
                    f"{proj['floor_added_us']:.2f} µs per connection, {proj['floor_pct']:.1f} % at nginx's "
                    "full speed, before any work is done in them; the probes used here (syscall "
                    "tracepoints, and the TCP state-change tracepoint for queue wait and in-flight) cannot "
                    f"cost less. accept-watch's own work in them is the other {work:.2f} µs."
                )
            bt = m["bpftrace"]
            add(
                f"  - The bpftrace one-liner (one syscall tracepoint, a line written per accept) costs "
                f"{_pct(1 - bt['rps_ratio']['median'])}, its process "
                f"{bt['cpu_pct']['median']:.1f} % of a core."
            )
        if t["id"] == "cpu10k":
            w10 = _workload(results, "nginx-10k")
            w1 = _workload(results, "nginx-1k")
            if w10 and w1:
                c1 = w1["summary"]["modes"]["aw"]["cpu_pct"]["median"]
                c10 = w10["summary"]["modes"]["aw"]["cpu_pct"]["median"]
                tw1 = statistics.median(
                    r["time_wait_start"] for rnd in _rounds_used(w1) for r in rnd["runs"] if r["mode"] == "aw"
                )
                tw10 = statistics.median(
                    r["time_wait_start"]
                    for rnd in _rounds_used(w10)
                    for r in rnd["runs"]
                    if r["mode"] == "aw"
                )
                add(
                    f"  - The daemon's CPU: {c1:.1f} % of a core at ~1 k/s, {c10:.1f} % at ~10 k/s."
                    f" Sockets in TIME_WAIT at the start of those runs (median): {tw1:,.0f} and "
                    f"{tw10:,.0f} (the server closes first, so each connection leaves one for 60 s)."
                )
            if prof and prof.get("top_inclusive"):
                top = prof["top_inclusive"][:4]
                add(
                    "  - py-spy (section above): "
                    + "; ".join(f"`{f['frame']}` {f['pct']:.0f} %" for f in top)
                    + " of the daemon's busy samples."
                )
        if t["id"] == "rss":
            runs = _all_aw_runs(results)
            if runs:
                anon = statistics.median(r["tool_mem_mb"]["RssAnon"] for r in runs)
                file_ = statistics.median(r["tool_mem_mb"]["RssFile"] for r in runs)
                add(
                    f"  - Of accept-watch's RSS, {file_:.0f} MB (median) is file-backed and {anon:.0f} MB "
                    "anonymous."
                )
            long = results.get("long_run") or {}
            if long:
                add(
                    f"  - Already {long['mem_start_mb']['VmRSS']:.0f} MB once attached, before any load "
                    f"(long run; {long_run_flatness(long)['growth_mb']:+.1f} MB from 100 k connections "
                    "to the end)."
                )
            if long.get("rss_by_mapping"):
                add(
                    "  - By mapping, at the end of the long run: "
                    + ", ".join(
                        f"`{Path(m['mapping']).name}` {m['rss_mb']:.0f} MB"
                        for m in long["rss_by_mapping"][:6]
                    )
                    + "."
                )
        if t["id"] == "flat" and results.get("long_run"):
            long = results["long_run"]
            add(
                f"  - RssAnon {long['mem_start_mb']['RssAnon']} MB before the load, "
                f"{long['mem_end_mb']['RssAnon']} MB at the end."
            )
        if t["id"] == "attach":
            startup = results.get("startup", {}).get("runs", [])
            if startup:
                comp = statistics.median(r["compile_s"] for r in startup if r["compile_s"] is not None)
                add(f"  - BCC compile (median) {comp:.2f} s of it.")
    add("")


def _all_runs(add: Any, results: dict[str, Any]) -> None:
    add("## All runs")
    add("")
    add("<details><summary>every run in order</summary>")
    add("")
    add(
        "| run | conn/s | p99 ms | tool CPU % | VmRSS MB | ready s | TIME_WAIT at start | "
        "others % core | counts |"
    )
    add("|---|---|---|---|---|---|---|---|---|")
    for w in results.get("workloads", []):
        for rnd in w["rounds"]:
            for run in rnd["runs"]:
                cpu = f"{run['tool_cpu_pct']:.1f}" if "tool_cpu_pct" in run else "—"
                rss = f"{run['tool_mem_mb']['VmRSS']:.0f}" if "tool_mem_mb" in run else "—"
                ready = f"{run['ready_s']:.2f}" if "ready_s" in run else "—"
                add(
                    f"| {run['label']}{' (disturbed)' if rnd['disturbed'] else ''} | "
                    f"{run['wrk']['rps']:.0f} | "
                    f"{run['wrk']['latency_us']['p99'] / 1000:.2f} | {cpu} | {rss} | {ready} | "
                    f"{run['time_wait_start']} | {run['others_cpu_pct']:.1f} | "
                    f"{run['counts'].get('verdict', '—')} |"
                )
    add("")
    add("</details>")
