"""The low-noise overhead measurement: loopback connections on one pinned CPU.

nginx + wrk at full speed on two shared cores varies by 3-4 % from run to run, too much to resolve a
1 % loss. Here one server process and one client process (micro/connbench.c) make N connections
pinned to CPU 0, the only work on that CPU; the tool under test runs on CPU 1, so what CPU 0 pays is
the BPF programs inside the server's and client's system calls and softirqs, nothing else. The wall
time per connection is stable to about ±1 % (CPU 0 does nothing else), so paired rounds resolve
differences of ~0.1 µs per connection.

Modes: baseline; aw (accept-watch as in the other runs, without the dashboard); aw-before (the same,
at an earlier commit: before.py); aw-noinflight (--no-inflight); floor and floor-noinflight (empty
programs on the hooks of aw and of aw-noinflight: micro/floor.py); bpftrace (the one-liner).
accept-watch's count must equal N in every aw mode.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .servers import REPO, VENV_BIN, free_port
from .summaries import spread
from .tools import AcceptWatch, Attached, Bpftrace, ToolError

MODES = ("baseline", "aw", "aw-before", "aw-noinflight", "floor", "floor-noinflight", "bpftrace")
MICRO = REPO / "scripts" / "bench" / "micro"
TOOL_CPU = "1"
BENCH_CPU = "0"


class FloorHooks(Attached):
    """Empty programs on accept-watch's hooks (micro/floor.py)."""

    name = "floor"

    def __init__(self, workdir: Path, inflight: bool = True) -> None:
        super().__init__(workdir)
        flags = [] if inflight else ["--no-inflight"]
        self.command = [str(VENV_BIN / "python"), str(MICRO / "floor.py"), *flags]

    def start(self) -> None:
        self._launch(self.command, self.workdir / "floor-stdout.txt")

    def _is_ready_line(self, line: str) -> bool:
        return line.startswith("floor: attached")


def _pinned(tool: AcceptWatch | FloorHooks | Bpftrace) -> Attached:
    tool.command = ["taskset", "-c", TOOL_CPU, *tool.command]
    return tool


def _parse(line: str) -> dict[str, float]:
    """connbench's result line: n=... wall=... cpu=... us_cpu_per_conn=... conn_s=..."""
    fields = dict(part.split("=", 1) for part in line.split())
    return {k: float(v) for k, v in fields.items()}


def build_connbench(workdir: Path) -> Path:
    binary = workdir / "connbench"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(MICRO / "connbench.c")], check=True)
    return binary


@contextlib.contextmanager
def connbench(binary: Path, n: int) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """connbench on BENCH_CPU, set up for n connections and waiting for "go" on its stdin: yields it
    and its pid (the process to attach to); killed and reaped on the way out if still running."""
    bench = subprocess.Popen(
        ["taskset", "-c", BENCH_CPU, str(binary), str(n), str(free_port()), "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert bench.stdout is not None and bench.stdin is not None
        first = bench.stdout.readline().split()
        if first[:1] != ["pid"]:
            raise ToolError(f"connbench did not start: {first}")
        yield bench, int(first[1])
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(timeout=10)


def run_one(binary: Path, mode: str, n: int, workdir: Path,
            before: list[str] | None = None) -> dict[str, Any]:
    wdir = workdir / f"loopback-{mode}-{time.monotonic_ns()}"
    wdir.mkdir()
    tool: Attached | None = None
    with connbench(binary, n) as (bench, pid):
        try:
            if mode == "aw":
                tool = _pinned(AcceptWatch(wdir, pid, events=False, dashboard_port=None))
            elif mode == "aw-before":
                tool = _pinned(AcceptWatch(wdir, pid, events=False, dashboard_port=None, prefix=before))
            elif mode == "aw-noinflight":
                tool = _pinned(AcceptWatch(wdir, pid, events=False, dashboard_port=None,
                                           extra=("--no-inflight",)))
            elif mode in ("floor", "floor-noinflight"):
                tool = _pinned(FloorHooks(wdir, inflight=mode == "floor"))
            elif mode == "bpftrace":
                tool = _pinned(Bpftrace(wdir))
            if tool is not None:
                tool.start()
                tool.wait_ready()
                time.sleep(0.5)
            bench.stdin.write("go\n")
            bench.stdin.flush()
            out = bench.stdout.read()
            if bench.wait(timeout=120) != 0:
                raise ToolError(f"connbench failed: {out.strip()}")
            rec: dict[str, Any] = {"mode": mode, **_parse(out.strip().splitlines()[-1])}
            rec["us_per_conn"] = round(rec["wall"] / n * 1e6, 4)
            if tool is not None:
                rc, _ = tool.interrupt()
                if rc != 0:
                    raise ToolError(f"{tool.name} exited with status {rc}")
            if isinstance(tool, AcceptWatch):
                export = tool.export()
                rec["aw_total"] = export["total_accepts"]
                rec["aw_unattributed"] = export["unattributed"]
                rec["exact"] = export["total_accepts"] == n and export["unattributed"] == 0
            return rec
        finally:
            if tool is not None:
                tool.kill()
            shutil.rmtree(wdir, ignore_errors=True)


def loopback_run(
    rounds: int, n: int, workdir: Path, wait_quiet: Callable[[float], dict[str, Any]], max_wait_s: float,
    log: Callable[[str], None], before: list[str] | None = None,
) -> dict[str, Any]:
    """before: the command of the earlier version (before.py); None leaves aw-before out."""
    if shutil.which("gcc") is None or shutil.which("taskset") is None:
        return {"skipped": "gcc or taskset not found"}
    binary = build_connbench(workdir)
    out: dict[str, Any] = {"connections_per_run": n, "rounds": []}
    modes = tuple(m for m in MODES if before is not None or m != "aw-before")
    for r in range(rounds):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        runs = []
        for mode in order:
            quiet = wait_quiet(max_wait_s)
            rec = run_one(binary, mode, n, workdir, before)
            rec["quiet_before"] = quiet
            runs.append(rec)
        base = next(x for x in runs if x["mode"] == "baseline")["us_per_conn"]
        for x in runs:
            x["added_us"] = round(x["us_per_conn"] - base, 4)
            x["loss"] = round(1 - base / x["us_per_conn"], 5)
        out["rounds"].append({"round": r + 1, "runs": runs})
        log(f"loopback round {r + 1}: " + ", ".join(f"{x['mode']} {x['us_per_conn']:.2f} µs" for x in runs))
    out["summary"] = summarize(out)
    return out


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    by_mode: dict[str, dict[str, list[float]]] = {}
    for rnd in out["rounds"]:
        for x in rnd["runs"]:
            d = by_mode.setdefault(x["mode"], {"us_per_conn": [], "added_us": [], "loss": []})
            for k in d:
                d[k].append(x[k])
    summary: dict[str, Any] = {mode: {k: _spread_sd(v) for k, v in d.items()} for mode, d in by_mode.items()}
    aw_runs = [x for rnd in out["rounds"] for x in rnd["runs"] if x["mode"].startswith("aw")]
    summary["aw_exact"] = sum(1 for x in aw_runs if x.get("exact"))
    summary["aw_runs"] = len(aw_runs)
    return summary



def _spread_sd(values: list[float]) -> dict[str, float]:
    """summaries.spread plus the run-to-run standard deviation (shown for the loopback runs)."""
    return {**(spread(values) or {}), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
