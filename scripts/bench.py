#!/usr/bin/env python3
"""`make bench`: accept-watch's overhead and exactness against a real server, side by side.

Runs (as root) nginx (2 workers) and gunicorn (8 sync workers) on loopback, loads them with wrk
(`Connection: close`, so every request is a new connection) at the highest rate the VM sustains and
at fixed lower rates, and measures in paired, interleaved rounds:

  baseline   nothing attached
  aw         accept-watch as installed (counters only, dashboard on, a client polling /api/snapshot 1/s)
  aw-events  the same with --events FILE (the per-connection stream, written as NDJSON)
  bpftrace   a bpftrace one-liner printing one line per accept (sys_exit_accept4) to a file
  aw-before, aw-events-before   aw and aw-events with accept-watch as of an earlier commit (--before
             REF, scripts/bench/before.py), at nginx's full speed and ~10 k/s: a change is measured
             against its predecessor in the same interleaved rounds

A pinned loopback measurement (scripts/bench/loopback.py) resolves what the nginx rounds cannot:
CPU per connection with accept-watch, with empty programs on its hooks (the floor), with bpftrace.
Then accept-watch's startup time (cold and warm layout cache), a py-spy profile of the daemon at
10 k connections/s, and a long run of 1 M connections (memory must stay flat). Counts are checked
against the servers' own records: an access log line per request with the worker's pid, and nginx's
stub_status count of accepted connections. Writes docs/benchmarks.json and docs/benchmarks.md.

    .venv/bin/python scripts/bench.py                 the full benchmark (~15 min on 2 cores)
    .venv/bin/python scripts/bench.py --quick --out-dir /tmp/b   a smoke test of the driver (~2 min)
    .venv/bin/python scripts/bench.py --render-only docs/benchmarks.json   rewrite the .md only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

import before
import benchdoc
import bpfstats
import issue14
import loopback
from modes import BEFORE_MODES
from procstat import (
    busy_cores,
    loadavg,
    machine,
    others_cpu_pct,
    rss_by_mapping,
    sample_others,
    time_wait_sockets,
)
from servers import REPO, VENV_BIN, Gunicorn, Nginx, Server, ServerError, free_port
from tools import (
    AcceptWatch,
    Attached,
    Bpftrace,
    Load,
    SnapshotPoller,
    ToolError,
    WrkProcess,
    repo_commit,
    run_wrk,
    version_of,
)

MODES = ("baseline", "aw", "aw-events", "bpftrace")
# Diagnostic mode (nginx at full speed only): accept-watch attached, its daemon stopped (SIGSTOP) for
# the load, so only the BPF programs run: their cost, separated from the daemon's.
PAUSED = "aw-paused"
SETTLE_S = 1.0  # after a tool is ready and before the load: its first map read, the first poll
QUIET_CORES = 0.25  # before a run, the VM must be (nearly) idle: at most this many cores busy
DISTURBED_PCT = 10.0  # other processes using more than this % of a core during a run: redo the round
PY_SPY = VENV_BIN / "py-spy"


class BenchError(Exception):
    """A one-line reason the benchmark cannot go on."""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ the quiet check


def wait_quiet(max_wait_s: float) -> dict[str, Any]:
    """Wait until the VM is idle (other sessions may be running tests); give up after max_wait_s."""
    started = time.monotonic()
    busy = busy_cores(1.0)
    announced = False
    while busy > QUIET_CORES and time.monotonic() - started < max_wait_s:
        if not announced:
            log(f"waiting for the VM to be idle ({busy:.2f} cores busy; load {loadavg()[0]:.2f})")
            announced = True
        time.sleep(4.0)
        busy = busy_cores(1.0)
    waited = time.monotonic() - started - 1.0
    return {
        "busy_cores": round(busy, 2),
        "waited_s": round(max(0.0, waited), 1),
        "quiet": busy <= QUIET_CORES,
    }


# ------------------------------------------------------------------------------ count checking


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
            rec["profile"] = benchdoc.summarize_py_spy(
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
    result["summary"] = benchdoc.summarize_workload(result, tuple(result["modes"]))
    return result


# ----------------------------------------------------------------------------------- startup


def measure_startup(workdir: Path, n_cold: int, n_warm: int, max_wait_s: float) -> dict[str, Any]:
    """Launch -> 'attached' line of accept-watch, with an empty (cold) and a filled (warm) kernel-layout
    cache. A private XDG_CACHE_HOME keeps the user's own cache out of it."""
    wdir = workdir / "startup"
    wdir.mkdir()
    server = Nginx(wdir)
    cache_home = wdir / "xdg-cache"
    layout_file = cache_home / "accept-watch" / "kernel-layout.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home))
    runs = []
    try:
        server.start()
        for kind, n in (("cold", n_cold), ("warm", n_warm)):
            for i in range(n):
                wait_quiet(max_wait_s)
                if kind == "cold":
                    shutil.rmtree(cache_home, ignore_errors=True)
                had_cache = layout_file.exists()
                rundir = wdir / f"{kind}{i + 1}"
                rundir.mkdir()
                tool = AcceptWatch(rundir, server.master_pid, events=False, dashboard_port=None, env=env)
                try:
                    tool.start()
                    ready = tool.wait_ready()
                    report = tool.attach_report()
                    # accept-watch installs its SIGINT handler just after printing the "attached" line;
                    # a SIGINT in between ends it with status 130 and no export.
                    time.sleep(0.5)
                    rc, _ = tool.interrupt()
                finally:
                    tool.kill()
                if rc != 0:
                    raise BenchError(f"accept-watch exited with status {rc} in the startup run")
                if kind == "cold" and had_cache:
                    raise BenchError("cold start with a layout cache present")
                runs.append(
                    {
                        "kind": kind,
                        "ready_s": round(ready, 3),
                        **report,
                        "cache_before": had_cache,
                        "cache_after": layout_file.exists(),
                        "time_wait": time_wait_sockets(),
                    }
                )
                log(
                    f"startup {kind} {i + 1}: ready in {ready:.2f} s (compile {report['compile_s']} s, "
                    f"attach {report['attach_s']} s)"
                )
    finally:
        server.stop()
    return {"runs": runs}


# ---------------------------------------------------------------------------------- long run


def long_run(workdir: Path, target: int, dash_port: int, max_wait_s: float) -> dict[str, Any]:
    """`target` connections through accept-watch (as installed) against nginx at full speed."""
    wdir = workdir / "long"
    wdir.mkdir()
    server = Nginx(wdir)
    tool: AcceptWatch | None = None
    poller: SnapshotPoller | None = None
    wrk: WrkProcess | None = None
    out: dict[str, Any] = {"target_connections": target}
    try:
        server.start()
        out["quiet_check"] = wait_quiet(max_wait_s)
        tool = AcceptWatch(wdir, server.master_pid, events=False, dashboard_port=dash_port)
        tool.start()
        out["ready_s"] = round(tool.wait_ready(), 3)
        poller = SnapshotPoller(dash_port)
        poller.wait_up()
        poller.start()
        time.sleep(2.0)
        mem_start = tool.memory_kib()
        ours = server.pids() | {os.getpid(), tool.pid}
        others0 = sample_others(ours)
        window = server.begin()
        cpu0, t0 = tool.cpu_seconds(), time.monotonic()
        wrk = WrkProcess(server.url, Load("long"), max_duration_s=max(60.0, target / 2000))
        samples = []
        done = 0
        while done < target:
            time.sleep(1.0)
            if wrk.proc.poll() is not None:
                raise BenchError("wrk ended before the long run reached its target")
            st = server.status()
            done = st["accepts"] - window.accepts - (server.status_calls - window.status_calls)
            mem = tool.memory_kib()
            samples.append(
                {
                    "t": round(time.monotonic() - t0, 1),
                    "connections": done,
                    "rss_mb": round(mem["VmRSS"] / 1024, 1),
                    "anon_mb": round(mem["RssAnon"] / 1024, 1),
                }
            )
        res = wrk.stop()
        wrk = None
        t1, cpu1 = time.monotonic(), tool.cpu_seconds()
        out["drain_s"] = round(server.drain(), 3)
        counts = server.end(window)
        out["others_cpu_pct"] = others_cpu_pct(others0, sample_others(ours))
        mem_end = tool.memory_kib()
        out["rss_by_mapping"] = rss_by_mapping(tool.pid)
        stats = poller.stop()
        poller = None
        rc, _ = tool.interrupt()
        if rc != 0:
            raise BenchError(f"accept-watch exited with status {rc} after the long run")
        doc = tool.export()
        out.update(
            {
                "wrk": {
                    "requests": res.requests,
                    "duration_s": round(res.duration_s, 1),
                    "rps": round(res.rps, 1),
                    "latency_us": res.latency_us,
                    "errors": res.errors,
                },
                "tool_cpu_pct": round(100.0 * (cpu1 - cpu0) / (t1 - t0), 1),
                "mem_start_mb": {k: round(v / 1024, 1) for k, v in mem_start.items()},
                "mem_end_mb": {k: round(v / 1024, 1) for k, v in mem_end.items()},
                "samples": samples,
                "poller": {"ok": stats.ok, "failed": stats.failed},
                "aw": {
                    "total_accepts": doc["total_accepts"],
                    "lost_events": doc["lost_events"],
                    "unattributed": doc["unattributed"],
                    "diagnostics": {k: v for k, v in doc["diagnostics"].items() if v},
                },
                "counts": compare_counts({w["pid"]: w["accepts"] for w in doc["workers"]}, counts, 64),
                "time_wait_end": time_wait_sockets(),
            }
        )
        log(
            f"long run: {counts.server_accepts} connections in {res.duration_s:.0f} s, rss "
            f"{mem_start['VmRSS'] / 1024:.0f} -> {mem_end['VmRSS'] / 1024:.0f} MB, "
            f"counts {out['counts']['verdict']}"
        )
    finally:
        if wrk is not None and wrk.proc.poll() is None:
            wrk.proc.kill()
        if poller is not None:
            poller.stop()
        if tool is not None:
            tool.kill()
        server.stop()
    return out


# ------------------------------------------------------------------------------------- main


WORKLOADS = [
    {
        "name": "nginx-max",
        "server": "nginx",
        "rate": None,
        "paused": True,
        "before": True,
        "title": "nginx, 2 workers, wrk at full speed",
    },
    {
        "name": "nginx-10k",
        "server": "nginx",
        "rate": 10000.0,
        "before": True,
        "title": "nginx, 2 workers, ~10 k connections/s",
    },
    {"name": "nginx-1k", "server": "nginx", "rate": 1000.0, "title": "nginx, 2 workers, ~1 k connections/s"},
    {
        "name": "gunicorn-max",
        "server": "gunicorn",
        "rate": None,
        "title": "gunicorn, 8 sync workers (demo/app.py, no sleep), wrk at full speed",
    },
]


def preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (accept-watch and bpftrace load eBPF programs)")
    for binary in ("nginx", "wrk", "bpftrace", "ss"):
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
            raise BenchError(f"{binary} not found (scripts/setup.sh installs the benchmark's packages)")
    if not (VENV_BIN / "accept-watch").exists():
        raise BenchError(f"{VENV_BIN / 'accept-watch'} not found (run scripts/setup.sh)")


def versions() -> dict[str, str]:
    return {
        "accept-watch": version_of([str(VENV_BIN / "accept-watch"), "--version"]),
        "nginx": version_of(["nginx", "-v"]),
        "wrk": version_of(["wrk", "-v"]).split(" Copyright")[0],
        "bpftrace": version_of(["bpftrace", "--version"]),
        "gunicorn": version_of([str(VENV_BIN / "gunicorn"), "--version"]),
        "python": version_of([str(VENV_BIN / "python"), "--version"]),
        "bcc (python3-bpfcc)": version_of(["dpkg-query", "-W", "-f=${Version}", "python3-bpfcc"]),
        "py-spy": version_of([str(PY_SPY), "--version"]) if PY_SPY.exists() else "not installed",
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out-dir", type=Path, default=REPO / "docs", help="where benchmarks.{json,md} go (docs/)"
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per workload (3)")
    p.add_argument("--max-rounds", type=int, default=5, help="rounds for nginx at full speed (5)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load per run (8)")
    p.add_argument(
        "--long", type=int, default=1_000_000, help="connections in the long run (1000000; 0 = skip)"
    )
    p.add_argument(
        "--workloads",
        default=",".join(w["name"] for w in WORKLOADS),
        help="comma-separated subset of: " + ", ".join(w["name"] for w in WORKLOADS),
    )
    p.add_argument("--startup-runs", type=int, default=3, help="cold and warm startups each (3)")
    p.add_argument("--calibrate-s", type=float, default=3.0, help="seconds per pacing calibration run (3)")
    p.add_argument(
        "--max-wait",
        type=float,
        default=180.0,
        help="seconds to wait for an idle VM before each run (180; then run anyway, noted)",
    )
    p.add_argument("--max-redo", type=int, default=2, help="rounds repeated per workload when disturbed (2)")
    p.add_argument(
        "--modes",
        type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
        help=f"comma-separated subset of the modes, to explore (default: {', '.join((*MODES, PAUSED))})",
    )
    p.add_argument(
        "--loopback-rounds", type=int, default=7,
        help="rounds of the pinned loopback measurement (7; 0 = skip)",
    )
    p.add_argument(
        "--loopback-conns", type=int, default=200_000, help="connections per pinned loopback run (200000)"
    )
    p.add_argument(
        "--before", default=before.DEFAULT_REF, metavar="REF",
        help=f"also run accept-watch as of this commit, side by side ({before.DEFAULT_REF}; '' = no)",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile run")
    p.add_argument(
        "--no-bpf-stats",
        action="store_true",
        help="skip the run that reads the BPF programs' own run time (kernel.bpf_stats_enabled)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke test: 1 round, 3 s runs, 100k long run")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, exports)")
    p.add_argument("--render-only", type=Path, metavar="JSON", help="only rewrite the .md from this JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.max_rounds, args.duration = 1, 1, 3.0
        args.long = min(args.long, 100_000)
        args.startup_runs, args.calibrate_s = 1, 2.0
        args.loopback_rounds, args.loopback_conns = 1, min(args.loopback_conns, 50_000)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.render_only:
        results = json.loads(args.render_only.read_text())
        results["targets"] = benchdoc.evaluate_targets(results)  # with the current evaluation code
        results["targets_14"] = issue14.evaluate(results)
        args.render_only.write_text(json.dumps(results, indent=1) + "\n")
        md = args.render_only.with_suffix(".md")
        md.write_text(benchdoc.render_markdown(results))
        log(f"wrote {md}")
        return 0
    preflight()
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(wanted) - {w["name"] for w in WORKLOADS})
    if unknown:
        raise BenchError(f"unknown workload(s): {', '.join(unknown)}")
    bad_modes = sorted(set(args.modes or ()) - {*MODES, PAUSED, *BEFORE_MODES})
    if bad_modes or (args.modes is not None and "baseline" not in args.modes):
        raise BenchError(f"--modes must include baseline and name only {', '.join((*MODES, PAUSED))}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="accept-watch-bench-"))
    dash_port = free_port()
    before_cmd: list[str] | None = None
    if args.before:
        before_cmd, before_commit = before.prepare(args.before, workdir)
    results: dict[str, Any] = {
        "schema": "accept-watch-bench/1",
        "generated_at": now_iso(),
        "command": "make bench  (= .venv/bin/python scripts/bench.py"
        + (" " + shlex.join(argv) if argv else "")
        + ")",
        "commit": repo_commit(),
        "before_commit": before_commit if before_cmd is not None else None,
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "rounds": args.rounds,
            "max_rate_rounds": args.max_rounds,
            "duration_s": args.duration,
            "connections": 64,
            "settle_s": SETTLE_S,
            "quiet_cores": QUIET_CORES,
            "disturbed_pct": DISTURBED_PCT,
            "modes": list(MODES),
            "diagnostic_mode": PAUSED,
            "quick": args.quick,
        },
        "load_before": {"loadavg": loadavg(), "time_wait": time_wait_sockets()},
    }
    log(f"machine: {results['machine']}; load {results['load_before']['loadavg']}; workdir {workdir}")
    try:
        results["load_before"]["quiet_check"] = wait_quiet(args.max_wait)
        results["startup"] = measure_startup(workdir, args.startup_runs, args.startup_runs, args.max_wait)
        results["workloads"] = []
        for spec in WORKLOADS:
            if spec["name"] not in wanted:
                continue
            spec = dict(spec, rounds=args.max_rounds if spec["name"] == "nginx-max" else args.rounds)
            results["workloads"].append(run_workload(spec, args, workdir, dash_port, before_cmd))
        if args.loopback_rounds > 0:
            results["loopback"] = loopback.loopback_run(
                args.loopback_rounds, args.loopback_conns, workdir, wait_quiet, args.max_wait, log, before_cmd
            )
        if not args.no_profile and "nginx-10k" in wanted:
            results["profile"] = profile_run(results, args, workdir, dash_port)
        if not args.no_bpf_stats:
            def quiet() -> Any:
                return wait_quiet(args.max_wait)
            results["bpf_stats"] = bpfstats.bpf_cost_run(args.duration, workdir, quiet, SETTLE_S, log)
            if before_cmd is not None:
                results["bpf_stats_before"] = bpfstats.bpf_cost_run(
                    args.duration, workdir, quiet, SETTLE_S, log, label="aw-before", prefix=before_cmd)
        if args.long > 0:
            results["long_run"] = long_run(workdir, args.long, dash_port, args.max_wait)
        results["load_after"] = {"loadavg": loadavg()}
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        # A --modes subset is for exploring: the targets and the document need every mode.
        results["targets"] = [] if args.modes else benchdoc.evaluate_targets(results)
        results["targets_14"] = [] if args.modes else issue14.evaluate(results)
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    json_path = args.out_dir / "benchmarks.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    if args.modes:
        log(f"wrote {json_path} in {results['elapsed_s']:.0f} s (--modes: no targets, no benchmarks.md)")
        for w in results["workloads"]:
            for mode, fig in w["summary"]["modes"].items():
                ratio = fig.get("rps_ratio") or {}
                if ratio:
                    med, lo, hi = (100 * (ratio[k] - 1) for k in ("median", "min", "max"))
                    log(f"{w['name']} {mode}: throughput vs baseline {med:+.1f} % "
                        f"(median of {ratio['n']}; {lo:+.1f} .. {hi:+.1f})")
        return 0
    md_path = args.out_dir / "benchmarks.md"
    md_path.write_text(benchdoc.render_markdown(results))
    log(f"wrote {json_path} and {md_path} in {results['elapsed_s']:.0f} s")
    for t in results["targets"] + results["targets_14"]:
        log(f"target {t['status']:6s} {t['target']}: {t['measured']}")
    return 0


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


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    # A run started in the background (`cmd &` ignores SIGINT) can still be stopped by SIGINT or
    # SIGTERM, and stops its servers and tools on the way out (the finally blocks).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main(sys.argv[1:]))
    except (BenchError, ServerError, ToolError, before.BeforeError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
