"""Where accept-watch's in-kernel cost goes: an extra run at nginx's full speed with the kernel's BPF
run-time statistics on (sysctl kernel.bpf_stats_enabled, restored afterwards), read per program with
bpftool; once per variant (the current version, and the earlier one when comparing). Not part of the
medians: the statistics themselves cost two clock reads per call."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .servers import Nginx
from .tools import AcceptWatch, Load, ToolError, run_wrk

BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
PROG_PREFIXES = ("tracepoint__", "raw_tracepoint", "kretfunc__", "kretprobe__")


def _bpf_progs() -> dict[int, dict[str, Any]]:
    out = subprocess.run(
        ["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=True
    ).stdout
    return {p["id"]: p for p in json.loads(out)}


def bpf_cost_run(duration_s: float, workdir: Path, wait_quiet: Callable[[], Any], settle_s: float,
                 log: Callable[[str], None], label: str = "aw",
                 prefix: list[str] | None = None) -> dict[str, Any]:
    """One run of accept-watch (prefix: another version's command, before.py) under full load."""
    if shutil.which("bpftool") is None:
        return {"skipped": "bpftool not found"}
    wdir = workdir / f"bpf-stats-{label}"
    wdir.mkdir()
    server = Nginx(wdir)
    tool: AcceptWatch | None = None
    previous = BPF_STATS.read_text().strip()
    try:
        server.start()
        wait_quiet()
        before_ids = set(_bpf_progs())
        tool = AcceptWatch(wdir, server.master_pid, events=False, dashboard_port=None, prefix=prefix)
        tool.start()
        tool.wait_ready()
        time.sleep(settle_s)
        # Programs loaded since the tool started, with accept-watch's function names (BCC names them
        # after the C functions; the kernel keeps the first 15 characters).
        ours = {
            i for i, p in _bpf_progs().items()
            if i not in before_ids and p.get("name", "").startswith(PROG_PREFIXES)
        }
        if not ours:
            raise ToolError("found no BPF program of accept-watch in bpftool's list")
        window = server.begin()
        BPF_STATS.write_text("1\n")
        try:
            start = _bpf_progs()
            wrk = run_wrk(server.url, Load("nginx-max"), duration_s)
            end = _bpf_progs()
        finally:
            BPF_STATS.write_text(previous + "\n")
        server.drain()
        counts = server.end(window)
        rc, _ = tool.interrupt()
        if rc != 0:
            raise ToolError(f"accept-watch exited with status {rc} after the BPF statistics run")
        conns = counts.server_accepts or 1
        progs = []
        for pid_ in sorted(ours):
            a, b = start.get(pid_, {}), end.get(pid_, {})
            calls = b.get("run_cnt", 0) - a.get("run_cnt", 0)
            ns = b.get("run_time_ns", 0) - a.get("run_time_ns", 0)
            progs.append({
                "name": b.get("name", a.get("name", "?")),
                "calls": calls,
                "calls_per_connection": round(calls / conns, 2),
                "ns_per_call": round(ns / calls) if calls else None,
                "ns_per_connection": round(ns / conns),
                "pct_of_core": round(100.0 * ns / 1e9 / wrk.duration_s, 2),
            })
        progs.sort(key=lambda p: -p["ns_per_connection"])
        total_ns = sum(p["ns_per_connection"] for p in progs) * conns
        out = {
            "label": label,
            "rps": round(wrk.rps, 1),
            "connections": counts.server_accepts,
            "duration_s": round(wrk.duration_s, 3),
            "programs": progs,
            "total_pct_of_core": round(100.0 * total_ns / 1e9 / wrk.duration_s, 2),
            "total_ns_per_connection": sum(p["ns_per_connection"] for p in progs),
        }
        log(
            f"bpf stats ({label}): {out['total_pct_of_core']:.1f} % of a core in accept-watch's BPF programs "
            f"at {wrk.rps:.0f} conn/s ({out['total_ns_per_connection']} ns per connection)"
        )
        return out
    finally:
        if tool is not None:
            tool.kill()
        server.stop()
