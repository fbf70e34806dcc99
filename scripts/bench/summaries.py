"""Summaries computed from the benchmark's JSON: per-workload medians and spreads, the py-spy
profile's top functions, the cost estimates and the long run's flatness."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from .modes import AW_MODES

RSS_LIMIT_MB = 150.0
FLAT_TOLERANCE_MB = 5.0  # RSS growth allowed between 100 k connections and the end of the long run


# --------------------------------------------------------------------------------- statistics


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def rounds_used(workload: dict[str, Any]) -> list[dict[str, Any]]:
    clean = [r for r in workload["rounds"] if not r["disturbed"]]
    return clean or workload["rounds"]


def summarize_workload(workload: dict[str, Any], modes: tuple[str, ...]) -> dict[str, Any]:
    """Per mode: medians and spreads, each ratio taken against the baseline of the same round."""
    rounds = rounds_used(workload)
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


def find_workload(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((w for w in results.get("workloads", []) if w["name"] == name), None)



def all_aw_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        run
        for w in results.get("workloads", [])
        for rnd in rounds_used(w)
        for run in rnd["runs"]
        if run["mode"] in AW_MODES
    ]


def cost_estimate(results: dict[str, Any]) -> dict[str, float] | None:
    """accept-watch's share of the machine's CPU at nginx's full speed, from accounting rather than
    throughput: the BPF programs' run time (bpf_stats run) and the daemon's CPU (median of the `aw`
    runs), each divided by the cores that client and server saturate. The BPF figure includes the
    statistics' own clock reads and leaves out the hooks' dispatch: it is an estimate, not a bound."""
    wmax = find_workload(results, "nginx-max")
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
    wmax = find_workload(results, "nginx-max")
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


