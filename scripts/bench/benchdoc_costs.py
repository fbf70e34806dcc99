"""The sections of docs/benchmarks.md on where accept-watch's cost goes (py-spy, BPF run time, the
pinned loopback runs) and what the measurement cannot tell."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .mdcells import pct
from .modes import LOOPBACK_LABELS
from .summaries import (
    all_aw_runs,
    find_workload,
    long_run_flatness,
    loopback_projection,
    rounds_used,
)


def _section_head(add: Any, title: str, run: dict[str, Any]) -> bool:
    """The section's title; False (after saying why) when its run was skipped."""
    add(f"## {title}")
    add("")
    if "skipped" in run:
        add(run["skipped"])
        add("")
        return False
    return True


def profile_section(add: Any, prof_run: dict[str, Any]) -> None:
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


def bpf_section(add: Any, bs: dict[str, Any]) -> None:
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


def loopback_section(add: Any, lb: dict[str, Any], projection: dict[str, float] | None) -> None:
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


def limits_section(add: Any, results: dict[str, Any]) -> None:
    """For each missed target, the measured figures that say what limits it (nothing hand-written)."""
    missed = [t for t in results.get("targets", []) if t["status"] == "missed"]
    add("## What limits the missed targets")
    add("")
    if not missed:
        add("No target was missed.")
        add("")
        return
    ncpu = results["machine"]["nproc"] or 1
    wmax = find_workload(results, "nginx-max")
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
                    f"  - With the daemon stopped (`aw-paused`) the loss is {pct(paused)}: the cost of the "
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
                f"{pct(1 - bt['rps_ratio']['median'])}, its process "
                f"{bt['cpu_pct']['median']:.1f} % of a core."
            )
        if t["id"] == "cpu10k":
            w10 = find_workload(results, "nginx-10k")
            w1 = find_workload(results, "nginx-1k")
            if w10 and w1:
                c1 = w1["summary"]["modes"]["aw"]["cpu_pct"]["median"]
                c10 = w10["summary"]["modes"]["aw"]["cpu_pct"]["median"]
                tw1 = statistics.median(
                    r["time_wait_start"] for rnd in rounds_used(w1) for r in rnd["runs"] if r["mode"] == "aw"
                )
                tw10 = statistics.median(
                    r["time_wait_start"]
                    for rnd in rounds_used(w10)
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
            runs = all_aw_runs(results)
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


