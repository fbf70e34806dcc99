"""BPF run time per call of two versions of accept-watch's programs, in interleaved rounds.

Usage (root, from the repository): .venv/bin/python -m scripts.bench.micro.ab_bpf [--before REF]
[--rounds R] [--n N]. Each round runs connbench (N loopback connections pinned to CPU 0) once with
the earlier version (REF, default HEAD: before.py unpacks it) and once with this checkout's
(working tree, uncommitted changes included), in alternating order (A B, B A, ...), accept-watch on
CPU 1 and kernel.bpf_stats_enabled=1 (restored afterwards). Per program: ns per call from the
kernel's run_time_ns/run_cnt of exactly the programs that run loaded, counted over connbench's
connections only. Prints medians and min-max per version, and the count check (must equal N).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..before import prepare
from ..loopback import build_connbench, connbench
from ..tools import AcceptWatch, ToolError

BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
PREFIXES = ("tracepoint__", "raw_tracepoint", "kretfunc__", "kretprobe__")


def progs() -> dict[int, dict[str, Any]]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"]: p for p in json.loads(out)}


def tool_progs(pid: int) -> dict[int, dict[str, int]]:
    """run_cnt/run_time_ns of the BPF programs this process holds (its fds' fdinfo): exactly this
    run's programs, not those of another accept-watch loaded meanwhile by someone else."""
    out: dict[int, dict[str, int]] = {}
    fddir = Path(f"/proc/{pid}/fdinfo")
    for fd in fddir.iterdir():
        try:
            info = dict(line.split(":", 1) for line in fd.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if "prog_id" in info and "run_cnt" in info:
            out[int(info["prog_id"])] = {"run_cnt": int(info["run_cnt"]),
                                         "run_time_ns": int(info["run_time_ns"])}
    return out


def one_run(binary: Path, n: int, workdir: Path, prefix: list[str] | None) -> dict[str, Any]:
    wdir = Path(tempfile.mkdtemp(dir=workdir))
    tool = None
    with connbench(binary, n) as (bench, bench_pid):
        try:
            tool = AcceptWatch(wdir, bench_pid, events=False, dashboard_port=None, prefix=prefix)
            tool.command = ["taskset", "-c", "1", *tool.command]
            tool.start()
            tool.wait_ready()
            time.sleep(0.5)
            assert tool.proc is not None
            names = {i: p.get("name", "?") for i, p in progs().items()}
            start = tool_progs(tool.proc.pid)
            bench.stdin.write("go\n")
            bench.stdin.flush()
            line = bench.stdout.read().strip().splitlines()[-1]
            bench.wait(timeout=120)
            end = tool_progs(tool.proc.pid)
            rc, _ = tool.interrupt()
            if rc != 0:
                raise ToolError(f"accept-watch exited with status {rc}")
            export = tool.export()
            rec: dict[str, Any] = {"wall_us": float(line.split("wall=")[1].split()[0]) / n * 1e6,
                                   "exact": export["total_accepts"] == n and export["unattributed"] == 0,
                                   "programs": {}}
            for pid, b in end.items():
                a = start.get(pid, {})
                calls = b["run_cnt"] - a.get("run_cnt", 0)
                ns = b["run_time_ns"] - a.get("run_time_ns", 0)
                name = names.get(pid, "?")
                if calls and name.startswith(PREFIXES):
                    rec["programs"][name] = {"ns_call": ns / calls, "ns_conn": ns / n,
                                             "calls_conn": calls / n}
            # Other processes' accepts (other users of the machine) run the program too, mostly its cheap
            # early return: a run where accept4 fired more than ~1 % over N is marked, left out of medians.
            acc = rec["programs"].get("tracepoint__syscalls__sys_exit_accept4", {})
            rec["clean"] = acc.get("calls_conn", 0) <= 1.01
            rec["total_ns_conn"] = sum(p["ns_conn"] for p in rec["programs"].values())
            return rec
        finally:
            if tool is not None:
                tool.kill()
            shutil.rmtree(wdir, ignore_errors=True)


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f} [{min(values):5.0f}-{max(values):5.0f}]"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="HEAD")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=100000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ab-bpf-"))
    previous = BPF_STATS.read_text().strip()
    try:
        binary = build_connbench(work)
        before_prefix, commit = prepare(args.before, work)
        BPF_STATS.write_text("1\n")
        results: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        for r in range(args.rounds):
            for label in ("AB" if r % 2 == 0 else "BA"):
                rec = one_run(binary, args.n, work, before_prefix if label == "A" else None)
                results[label].append(rec)
                key = {k: round(v["ns_call"]) for k, v in rec["programs"].items()
                       if "accept4" in k or "set_st" in k}
                print(f"round {r + 1} {label}: total {rec['total_ns_conn']:.0f} ns/conn {key} "
                      f"exact={rec['exact']} clean={rec['clean']}", flush=True)
        print(f"A = {commit} (before), B = working tree; median [min-max] of {args.rounds} rounds, "
              f"N={args.n}")
        for label in "AB":
            results[label] = [r for r in results[label] if r["clean"]] or results[label]
        names = sorted({k for recs in results.values() for rec in recs for k in rec["programs"]})
        for name in names:
            for label in "AB":
                vals = [rec["programs"][name]["ns_call"] for rec in results[label] if name in rec["programs"]]
                if vals:
                    print(f"{name[:40]:40s} {label} ns/call {fmt(vals)}")
        for label in "AB":
            print(f"total ns/conn {label} {fmt([r['total_ns_conn'] for r in results[label]])}  "
                  f"wall µs/conn {statistics.median([r['wall_us'] for r in results[label]]):.2f}  "
                  f"exact {sum(r['exact'] for r in results[label])}/{len(results[label])} (clean runs)")
    finally:
        BPF_STATS.write_text(previous + "\n")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
