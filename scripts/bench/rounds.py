"""One measured run (a server, a load, a tool attached or not), paired rounds of a workload, and
the count check of each run against the server's own records."""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from . import summaries
from .common import (
    DISTURBED_PCT,
    PY_SPY,
    SETTLE_S,
    BenchError,
    log,
    now_iso,
    wait_quiet,
)
from .modes import BEFORE_MODES, MODES, PAUSED
from .procstat import (
    loadavg,
    others_cpu_pct,
    sample_others,
    time_wait_sockets,
)
from .servers import Gunicorn, Nginx, Server
from .tools import (
    AcceptWatch,
    Attached,
    Bpftrace,
    Load,
    SnapshotPoller,
    run_wrk,
)


def compare_counts(
    tool_by_pid: dict[int, int], counts: Any, connections: int, extra: int = 0
) -> dict[str, Any]:
    """A tool's per-pid accept counts against the server's records of the same window.

    The access log has a line per request; a connection accepted but closed before it sent a request
    (wrk stopping mid-way) has none, so per worker tool >= log. nginx's stub_status counts every
    accepted connection: its total must equal the tool's. `extra` = accepts the tool sees that are
    not TCP connections of the load (the bpftrace one-liner also counts our stub_status queries)."""
    pids = sorted(set(tool_by_pid) | set(counts.log_by_pid))
    rows = [{"pid": p, "tool": tool_by_pid.get(p, 0), "log": counts.log_by_pid.get(p, 0)} for p in pids]
    for r in rows:
        r["diff"] = r["tool"] - r["log"]
    tool_total = sum(tool_by_pid.values())
    excess = sum(r["diff"] for r in rows)
    nonneg = all(r["diff"] >= 0 for r in rows)
    out: dict[str, Any] = {
        "tool_total": tool_total,
        "log_lines": counts.log_lines,
        "server_accepts": counts.server_accepts,
        "extra_expected": extra,
        "per_pid": rows,
    }
    if counts.server_accepts is not None:
        unlogged = counts.server_accepts - counts.log_lines
        out["unlogged"] = unlogged
        exact_total = tool_total == counts.server_accepts + extra
        consistent = nonneg and excess == unlogged + extra
        out["verdict"] = "exact" if exact_total and consistent else "MISMATCH"
    else:
        # No independent total: the excess must be explainable by connections in flight at the stop.
        out["unlogged"] = None
        if excess == 0 and nonneg:
            out["verdict"] = "exact"
        elif nonneg and excess <= connections:
            out["verdict"] = "consistent"
        else:
            out["verdict"] = "MISMATCH"
    return out


# ------------------------------------------------------------------------------------- one run


def run_once(
    server: Server,
    load: Load,
    mode: str,
    duration: float,
    workdir: Path,
    label: str,
    dash_port: int,
    max_wait_s: float,
    profile_s: float | None = None,
    before_cmd: list[str] | None = None,
) -> dict[str, Any]:
    rundir = workdir / label
    rundir.mkdir(parents=True, exist_ok=True)
    quiet = wait_quiet(max_wait_s)
    rec: dict[str, Any] = {
        "label": label,
        "mode": mode,
        "started_at": now_iso(),
        "quiet_check": quiet,
        "loadavg_start": loadavg(),
        "time_wait_start": time_wait_sockets(),
    }
    tool: Attached | None = None
    poller: SnapshotPoller | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        if mode in ("aw", "aw-events", PAUSED, *BEFORE_MODES):
            tool = AcceptWatch(
                rundir, server.master_pid, events=mode in ("aw-events", "aw-events-before"),
                dashboard_port=dash_port, prefix=before_cmd if mode in BEFORE_MODES else None,
            )
        elif mode == "bpftrace":
            tool = Bpftrace(rundir)
        if tool is not None:
            tool.start()
            rec["ready_s"] = round(tool.wait_ready(), 3)
            if isinstance(tool, AcceptWatch):
                rec["attach"] = tool.attach_report()
                if mode != PAUSED:
                    poller = SnapshotPoller(dash_port)
                    rec["dashboard_up_s"] = round(poller.wait_up(), 3)
                    poller.start()
        time.sleep(SETTLE_S)
        ours = server.pids() | {os.getpid()} | ({tool.pid} if tool else set())
        others0 = sample_others(ours)
        window = server.begin()
        if profile_s is not None and tool is not None:
            spy = subprocess.Popen(
                [
                    str(PY_SPY),
                    "record",
                    "-p",
                    str(tool.pid),
                    "-d",
                    f"{int(profile_s)}",
                    "-r",
                    "100",
                    "--nonblocking",
                    "--nolineno",
                    "-f",
                    "raw",
                    "-o",
                    str(rundir / "py-spy.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        if mode == PAUSED and tool is not None:
            os.kill(tool.pid, signal.SIGSTOP)
        cpu0 = tool.cpu_seconds() if tool else 0.0
        t0 = time.monotonic()
        wrk = run_wrk(server.url, load, duration)
        t1 = time.monotonic()
        cpu1 = tool.cpu_seconds() if tool else 0.0
        rec["drain_s"] = round(server.drain(), 3)
        counts = server.end(window)
        if mode == PAUSED and tool is not None:
            os.kill(tool.pid, signal.SIGCONT)
            time.sleep(1.5)  # let it read its maps once more before the SIGINT
        rec["others_cpu_pct"] = others_cpu_pct(others0, sample_others(ours))
        rec["time_wait_end"] = time_wait_sockets()
        rec["wrk"] = {
            "requests": wrk.requests,
            "duration_s": round(wrk.duration_s, 3),
            "rps": round(wrk.rps, 1),
            "latency_us": wrk.latency_us,
            "errors": wrk.errors,
        }
        rec["server"] = {
            "log_lines": counts.log_lines,
            "accepts": counts.server_accepts,
            "accept_rate": round(counts.server_accepts / wrk.duration_s, 1)
            if counts.server_accepts is not None
            else None,
        }
        if spy is not None:
            _, err = spy.communicate(timeout=profile_s + 30 if profile_s else 60)
            if spy.returncode != 0:
                raise BenchError(f"py-spy failed: {err.decode(errors='replace').strip()[-200:]}")
            rec["profile"] = summaries.summarize_py_spy(
                rundir / "py-spy.txt", rate_hz=100, seconds=float(int(profile_s or 0))
            )
        if tool is not None:
            rec["tool_cpu_pct"] = round(100.0 * (cpu1 - cpu0) / (t1 - t0), 1)
            mem = tool.memory_kib()
            rec["tool_mem_mb"] = {k: round(v / 1024, 1) for k, v in mem.items()}
        if poller is not None:
            stats = poller.stop()
            rec["poller"] = {
                "ok": stats.ok,
                "failed": stats.failed,
                "last_error": stats.last_error,
                "median_ms": round(statistics.median(stats.latencies_ms), 1) if stats.latencies_ms else None,
                "max_ms": round(max(stats.latencies_ms), 1) if stats.latencies_ms else None,
            }
            poller = None
        if tool is not None:
            rc, stop_s = tool.interrupt()
            rec["tool_exit"] = {"status": rc, "seconds": round(stop_s, 2)}
            if rc != 0:
                raise BenchError(f"{tool.name} exited with status {rc} after SIGINT ({label})")
        if isinstance(tool, AcceptWatch):
            doc = tool.export()
            by_pid = {w["pid"]: w["accepts"] for w in doc["workers"]}
            rec["aw"] = {
                "probe": doc["probe"],
                "total_accepts": doc["total_accepts"],
                "lost_events": doc["lost_events"],
                "unattributed": doc["unattributed"],
                "diagnostics": {k: v for k, v in doc["diagnostics"].items() if v},
                "event_lines": tool.event_lines(),
            }
            rec["counts"] = compare_counts(by_pid, counts, load.connections)
        elif isinstance(tool, Bpftrace):
            by_pid, lines, lost = tool.counts(server.pids())
            rec["bpftrace"] = {"lines": lines, "lost_events": lost}
            rec["counts"] = compare_counts(by_pid, counts, load.connections, extra=counts.status_calls)
        else:
            # Baseline: the server's own two records against each other.
            rec["counts"] = {
                "log_lines": counts.log_lines,
                "server_accepts": counts.server_accepts,
                "unlogged": (counts.server_accepts - counts.log_lines)
                if counts.server_accepts is not None
                else None,
            }
    finally:
        if poller is not None:
            poller.stop()
        if spy is not None and spy.poll() is None:
            spy.kill()
        if tool is not None:
            tool.kill()
    return rec


def _short(rec: dict[str, Any]) -> str:
    parts = [f"{rec['wrk']['rps']:8.0f} conn/s", f"p99 {rec['wrk']['latency_us']['p99'] / 1000:6.2f} ms"]
    if "tool_cpu_pct" in rec:
        parts.append(f"cpu {rec['tool_cpu_pct']:5.1f}%")
    if "tool_mem_mb" in rec:
        parts.append(f"rss {rec['tool_mem_mb']['VmRSS']:.0f} MB")
    if "ready_s" in rec:
        parts.append(f"ready {rec['ready_s']:.2f} s")
    if "counts" in rec and "verdict" in rec["counts"]:
        parts.append(f"counts {rec['counts']['verdict']}")
    if "aw" in rec and rec["aw"]["lost_events"]:
        parts.append(f"lost {rec['aw']['lost_events']}")
    if rec.get("others_cpu_pct", 0) > 2:
        parts.append(f"others {rec['others_cpu_pct']}%")
    return "  ".join(parts)


# ---------------------------------------------------------------------------------- workloads


def make_server(kind: str, workdir: Path) -> Server:
    if kind == "nginx":
        return Nginx(workdir)
    if kind == "gunicorn":
        return Gunicorn(workdir, workers=8)
    raise BenchError(f"unknown server {kind!r}")


def calibrate(server: Server, name: str, rate: float, connections: int, seconds: float) -> tuple[Load, list]:
    """Find the per-connection delay that gives about `rate` connections/s (no tool attached).

    A connection's cycle is the delay plus connect + request time, which the first try measures."""
    delay = connections * 1000.0 / rate
    tries = []
    for _ in range(2):
        res = run_wrk(server.url, Load(name, rate, connections, delay), seconds)
        tries.append({"delay_ms": round(delay, 3), "rps": round(res.rps, 1)})
        overhead_ms = connections * 1000.0 / res.rps - delay
        delay = max(0.0, connections * 1000.0 / rate - overhead_ms)
    return Load(name, rate, connections, delay), tries


def run_workload(
    spec: dict[str, Any], args: argparse.Namespace, workdir: Path, dash_port: int,
    before_cmd: list[str] | None = None,
) -> dict[str, Any]:
    name = spec["name"]
    wdir = workdir / name
    wdir.mkdir()
    server = make_server(spec["server"], wdir)
    log(f"{name}: starting {spec['server']}")
    result: dict[str, Any] = {"name": name, "server": spec["server"], "title": spec["title"], "rounds": []}
    try:
        server.start()
        result["workers"] = len(server.worker_pids())
        if spec.get("rate"):
            load, tries = calibrate(server, name, spec["rate"], 64, args.calibrate_s)
            result["calibration"] = tries
            log(
                f"{name}: delay {load.delay_ms:.2f} ms per connection for ~{spec['rate']:.0f}/s "
                f"(tries: {tries})"
            )
        else:
            load = Load(name)
        result["load"] = {
            "rate": load.rate,
            "connections": load.connections,
            "delay_ms": round(load.delay_ms, 3) if load.delay_ms is not None else None,
            "duration_s": args.duration,
        }
        rounds = spec["rounds"]
        modes = (*MODES, PAUSED) if spec.get("paused") else MODES
        if before_cmd is not None and spec.get("before"):
            modes = (*modes, *BEFORE_MODES)
        if args.modes:
            modes = tuple(m for m in modes if m in args.modes)
        result["modes"] = list(modes)
        redo_left = args.max_redo
        r = 0
        order_seed = 0
        while r < rounds:
            # Rotate the order every round so that no mode always follows the same one.
            order = [modes[(i + order_seed) % len(modes)] for i in range(len(modes))]
            order_seed += 1
            runs = []
            for mode in order:
                label = f"{name}-r{len(result['rounds']) + 1}-{mode}"
                rec = run_once(server, load, mode, args.duration, wdir, label, dash_port, args.max_wait,
                               before_cmd=before_cmd)
                log(f"{label:28s} {_short(rec)}")
                runs.append(rec)
            disturbed = max(x["others_cpu_pct"] for x in runs) > DISTURBED_PCT
            result["rounds"].append({"order": order, "runs": runs, "disturbed": disturbed})
            if disturbed and redo_left > 0:
                redo_left -= 1
                log(
                    f"{name}: other processes used more than {DISTURBED_PCT:.0f} % of a core during a run; "
                    "repeating the round"
                )
                continue
            r += 1
    finally:
        server.stop()
    result["summary"] = summaries.summarize_workload(result, tuple(result["modes"]))
    return result


# ----------------------------------------------------------------------------------- startup




def profile_run(
    results: dict[str, Any], args: argparse.Namespace, workdir: Path, dash_port: int
) -> dict[str, Any]:
    """One more accept-watch run at ~10 k/s with py-spy sampling the daemon (not part of the medians:
    py-spy itself costs CPU)."""
    if not PY_SPY.exists():
        return {"skipped": f"py-spy not installed ({PY_SPY}); .venv/bin/python -m pip install py-spy"}
    wl = next(w for w in results["workloads"] if w["name"] == "nginx-10k")
    wdir = workdir / "profile"
    wdir.mkdir()
    server = Nginx(wdir)
    try:
        server.start()
        load = Load("nginx-10k", wl["load"]["rate"], wl["load"]["connections"], wl["load"]["delay_ms"])
        duration = max(args.duration, 10.0)
        rec = run_once(
            server,
            load,
            "aw",
            duration,
            wdir,
            "profile-nginx-10k-aw",
            dash_port,
            args.max_wait,
            profile_s=duration - 1.0,
        )
        log(f"profile: {_short(rec)}")
    finally:
        server.stop()
    return rec

