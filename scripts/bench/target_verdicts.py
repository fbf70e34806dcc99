"""The issue's targets, each met / missed / not run, from the benchmark's JSON."""

from __future__ import annotations

from typing import Any

from .mdcells import pct
from .modes import AW_MODES
from .summaries import (
    FLAT_TOLERANCE_MB,
    RSS_LIMIT_MB,
    all_aw_runs,
    cost_estimate,
    find_workload,
    long_run_flatness,
    loopback_projection,
    rounds_used,
)


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's targets, each met / missed / not run, with the measured figure."""
    out: list[dict[str, str]] = []

    def add(key: str, target: str, status: str, measured: str) -> None:
        out.append({"id": key, "target": target, "status": status, "measured": measured})

    wmax = find_workload(results, "nginx-max")
    if wmax:
        m = wmax["summary"]["modes"]
        loss = 1 - m["aw"]["rps_ratio"]["median"]
        bt_loss = 1 - m["bpftrace"]["rps_ratio"]["median"]
        spread = m["aw"]["rps_ratio"]
        measured = (
            f"{pct(loss)} (median of {spread['n']} rounds, spread {pct(1 - spread['max'])} to "
            f"{pct(1 - spread['min'])}; accept-watch default mode)"
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
            f"accept-watch {pct(loss)} vs bpftrace {pct(bt_loss)}",
        )
        runs = [run for rnd in rounds_used(wmax) for run in rnd["runs"] if run["mode"] in AW_MODES]
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
    ev_runs = [r for r in all_aw_runs(results) if r["mode"] == "aw-events"]
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
    w10 = find_workload(results, "nginx-10k")
    if w10:
        c = w10["summary"]["modes"]["aw"]["cpu_pct"]
        rate = w10["summary"]["modes"]["aw"]["rps"]["median"]
        add(
            "cpu10k",
            "accept-watch ≤ 10 % of one core at 10 k accepts/s",
            "met" if c["median"] <= 10 else "missed",
            f"{c['median']:.1f} % (median; {c['min']:.1f}–{c['max']:.1f}) at {rate:.0f} conn/s",
        )
    rss_runs = all_aw_runs(results)
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


