"""docs/benchmarks.md, rendered from the benchmark's JSON (so the
markdown can be re-rendered from a stored run: python -m scripts.bench --render-only docs/benchmarks.json)."""

from __future__ import annotations

import statistics
from typing import Any

from . import issue14
from .benchdoc_costs import bpf_section, limits_section, loopback_section, profile_section
from .mdcells import median_cell, ratio_cell, verdict_cell
from .modes import MODE_TEXT
from .summaries import (
    all_aw_runs,
    long_run_flatness,
    loopback_projection,
)
from .tools import BPFTRACE_PROGRAM


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
    probes = sorted({r["aw"]["probe"] for r in all_aw_runs(results) if "aw" in r})
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
    issue14.render(add, results)
    _method(add, results)
    for w in results.get("workloads", []):
        _workload_section(add, w)
    _startup_section(add, results.get("startup"))
    if results.get("long_run"):
        _long_section(add, results["long_run"])
    if results.get("profile"):
        profile_section(add, results["profile"])
    if results.get("bpf_stats"):
        bpf_section(add, results["bpf_stats"])
    if results.get("loopback"):
        loopback_section(add, results["loopback"], loopback_projection(results))
    limits_section(add, results)
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
        counts = verdict_cell(ms["verdicts"])
        if base and ms["unlogged"] is not None:
            counts = f"unlogged {ms['unlogged']['min']:.0f}–{ms['unlogged']['max']:.0f}"
        add(
            f"| {MODE_TEXT[mode]} | {median_cell(ms['rps'], '{:.0f}')} | "
            f"{'—' if base else ratio_cell(ms['rps_ratio'])} | "
            f"{median_cell(ms['p99_ms'], '{:.2f}')} | {'—' if base else ratio_cell(ms['p99_ratio'])} | "
            f"{cpu} | {rss} | "
            f"{lost} | {counts} |"
        )
    if "aw-paused" in s["modes"]:
        add("")
        add(
            f"p99 change with the daemon stopped during the load (`aw-paused`): "
            f"{ratio_cell(s['modes']['aw-paused']['p99_ratio'])}; with it running (`aw`): "
            f"{ratio_cell(s['modes']['aw']['p99_ratio'])}."
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
        "before. BCC compiles the program at every launch either way. Phase by phase, with memory, "
        "before/after interleaved: [bench-startup.md](bench-startup.md) (`make bench-startup`)."
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
    if long.get("compiler_memory"):
        cm = long["compiler_memory"]
        add(
            f"Compiler libraries (libLLVM, libclang) at the end: {cm['rss_mb']:.1f} MB resident, "
            f"{cm['private_mb']:.1f} MB of it mapped by accept-watch alone, of {cm['mapped_mb']:.1f} MB "
            "mapped. accept-watch advises them out (MADV_PAGEOUT) after compiling; how much leaves RAM "
            "is the kernel's reclaim's choice and varies with the host's memory pressure."
        )
        add("")
    per = ", ".join(f"{r['pid']}: {r['tool']} vs {r['log']}" for r in c["per_pid"] if r["tool"] or r["log"])
    add(
        f"Counts: accept-watch {c['tool_total']:,}, nginx accepts {c['server_accepts']:,}, access log "
        f"{c['log_lines']:,} (per worker, accept-watch vs log: {per}) → **{c['verdict']}**; "
        f"unattributed {long['aw']['unattributed']}, lost events {long['aw']['lost_events']}."
    )
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
