"""accept-watch's startup time (cold and warm layout cache) and the long run (memory must stay flat)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from .common import (
    BenchError,
    log,
    wait_quiet,
)
from .procstat import (
    compiler_memory,
    others_cpu_pct,
    rss_by_mapping,
    sample_others,
    time_wait_sockets,
)
from .rounds import compare_counts
from .servers import Nginx
from .tools import (
    AcceptWatch,
    Load,
    SnapshotPoller,
    WrkProcess,
)


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
        out["compiler_memory"] = compiler_memory(tool.pid)
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


