"""`make bench-startup`: accept-watch's launch -> attached time, phase by phase, and its memory once
attached, for this tree and an earlier commit side by side (docs/bench-startup.md).

Each round launches every variant once, in an order that alternates from round to round, against one
nginx (2 workers): so both versions see the same machine load, and the medians compare. "Attached" is
what `make bench` measures: from the launch to the `probe ... attached` line on stderr. The phases come
from scripts/bench/startup_trace.py, which runs the CLI with timestamps around its startup functions.
Memory is read from /proc after a short wrk burst (the --events variants write every connection).

    python scripts/bench_startup.py [--rounds 7] [--before REF] [--out docs/bench-startup.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: scripts.bench is a package

from scripts.bench import before
from scripts.bench.procstat import (
    OthersSample,
    cpu_seconds,
    loadavg,
    machine,
    memory_kib,
    others_cpu_pct,
    sample_others,
)
from scripts.bench.servers import REPO, VENV_BIN, Nginx
from scripts.bench.startup_doc import render
from scripts.bench.tools import AcceptWatch, Load, WrkProcess

TRACER = REPO / "scripts" / "bench" / "startup_trace.py"
DEFAULT_BEFORE = "0f2ad17"  # main when issue 14's startup work began
CONFIGS = {
    # As `make bench` launches it for its startup section, and for its --events runs.
    "plain": {"events": False, "dashboard": False},
    "events+dashboard": {"events": True, "dashboard": True},
}
BURST = Load("burst", rate=None, connections=16)
# Another BCC process holding libLLVM/libclang mapped and resident, as on a machine running a second
# tool (the benchmark's other modes, another user's bcc script): pages of a library that another
# process maps as well are what MADV_PAGEOUT could not give back.
NEIGHBOUR = ("import bcc, sys, time; b = bcc.BPF(text=b'int f(void *ctx) { return 0; }'); "
             "print('ready', flush=True); sys.stdin.read()")


def compiler_rss_kib(pid: int) -> int:
    """Resident KiB of libLLVM/libclang mappings in `pid` (shared pages included, as VmRSS does)."""
    total, counting = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and not parts[0].endswith(":"):
                counting = len(parts) > 5 and ("libLLVM" in parts[5] or "libclang" in parts[5])
            elif counting and parts[0] == "Rss:":
                total += int(parts[1])
    return total


def launch(workdir: Path, nginx: Nginx, version: str, site: Path | None, config: str) -> dict[str, Any]:
    cfg = CONFIGS[config]
    trace = workdir / "trace.json"
    prefix = [str(VENV_BIN / "python"), str(TRACER), str(trace), *([str(site)] if site else []), "--"]
    tool = AcceptWatch(workdir, nginx.master_pid, events=cfg["events"],
                       dashboard_port=0 if cfg["dashboard"] else None, prefix=prefix,
                       extra=("--quiet",) if cfg["dashboard"] else ())
    load_before = loadavg()[0]
    others0: OthersSample = sample_others({os.getpid()})
    try:
        tool.start()
        ready = tool.wait_ready()
        cpu = cpu_seconds(tool.pid)  # all threads, user + system (the verifier runs as system time)
        others = others_cpu_pct(others0, sample_others({os.getpid(), tool.pid}))
        time.sleep(0.5)  # the SIGINT handler is installed just after the attached line
        mem_idle = memory_kib(tool.pid)
        wrk = WrkProcess(f"http://127.0.0.1:{nginx.port}/", BURST, max_duration_s=10)
        time.sleep(2.0)
        wrk.stop()
        time.sleep(1.2)  # one more read interval: the events written, the maps read
        mem = memory_kib(tool.pid)
        llvm = compiler_rss_kib(tool.pid)
        rc, _ = tool.interrupt()
    finally:
        tool.kill()
    if rc != 0:
        raise SystemExit(f"bench-startup: {version} {config} exited with status {rc}: "
                         f"{tool.stderr_lines[-3:]}")
    data = json.loads(trace.read_text())
    return {
        "version": version, "config": config, "ready_s": ready, "cpu_s": cpu, "report": tool.attach_report(),
        "phases": phases(data, tool.launched_at), "vmrss_idle_mb": mem_idle["VmRSS"] / 1024,
        "vmrss_mb": mem["VmRSS"] / 1024, "rssanon_mb": mem["RssAnon"] / 1024,
        "rssfile_mb": mem["RssFile"] / 1024, "compiler_rss_mb": llvm / 1024,
        "load1": load_before, "others_pct": others,
    }


def phases(data: dict[str, Any], launched: float) -> dict[str, float]:
    """Seconds since the launch at which each phase ended (and the compile's own start and length)."""
    marks, calls = data["marks"], data["calls"]

    def first(name: str) -> tuple[float, float] | None:
        hit = [(a, b) for n, a, b in calls if n == name]
        return hit[0] if hit else None

    out: dict[str, float] = {"python_started": marks["trace_start"] - launched}
    for key, mark in (("cli_imported", "imported cli"), ("watch_imported", "imported watch"),
                      ("attached_line", "attached_line")):
        if mark in marks:
            out[key] = marks[mark] - launched
    for key, name in (("discovered", "discover"), ("layout_loaded", "load_layout"),
                      ("waitmodes_sampled", "WaitModes.__init__"), ("dashboard_bound", "_bind_dashboard")):
        hit = first(name)
        if hit:
            out[key] = hit[1] - launched
    comp = first("manual_attach_bpf")
    if comp:
        out["compile_started"], out["compile_s"] = comp[0] - launched, comp[1] - comp[0]
    att = first("AcceptProbes.attach")
    if att:
        out["attach_called"] = att[0] - launched
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="the earlier commit (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench-startup.md")
    parser.add_argument("--after", default=None, help="a commit instead of the working tree (default)")
    parser.add_argument("--no-neighbour", action="store_true",
                        help="no other BCC process mapping the compiler libraries during the runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw runs here")
    args = parser.parse_args()
    # The options that change what is measured (not where the results go), for the document.
    shown = [a for a in (f"--rounds {args.rounds}" if args.rounds != 7 else "",
                         f"--before {args.before}" if args.before != DEFAULT_BEFORE else "",
                         f"--after {args.after}" if args.after else "",
                         "--no-neighbour" if args.no_neighbour else "") if a]
    if os.geteuid() != 0:
        print("bench-startup: needs root (BPF)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="aw-bench-startup-"))
    try:
        _, commit = before.prepare(args.before, tmp)
        site = tmp / f"before-{commit}" / "_site"
        if args.after:
            (tmp / "after").mkdir()
            _, head = before.prepare(args.after, tmp / "after")
            after_site: Path | None = tmp / "after" / f"before-{head}" / "_site"
        else:
            head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, check=True).stdout.strip()
            head += "+" if dirty else ""
            after_site = None
        versions = [(f"before {commit}", site), (f"after {head}", after_site)]
        variants = [(v, s, c) for c in CONFIGS for v, s in versions]
        nginx = Nginx(tmp / "nginx")
        (tmp / "nginx").mkdir()
        nginx.start()
        neighbour = None
        if not args.no_neighbour:
            neighbour = subprocess.Popen([str(VENV_BIN / "python"), "-c", NEIGHBOUR], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
            if neighbour.stdout is None or neighbour.stdout.readline().strip() != "ready":
                raise SystemExit("bench-startup: the neighbour BCC process did not start")
        runs: list[dict[str, Any]] = []
        started = time.time()
        try:
            for rnd in range(args.rounds):
                order = variants if rnd % 2 == 0 else variants[::-1]
                for i, (version, s, config) in enumerate(order):
                    wdir = tmp / f"r{rnd}-{i}"
                    wdir.mkdir()
                    run = launch(wdir, nginx, version, s, config)
                    run["round"] = rnd + 1
                    runs.append(run)
                    print(f"round {rnd + 1} {version:>16} {config:>16}: attached {run['ready_s']:.2f} s, "
                          f"VmRSS {run['vmrss_mb']:.0f} MB (load {run['load1']:.1f})", flush=True)
        finally:
            nginx.stop()
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
        meta = {"neighbour": neighbour is not None, "machine": machine(), "rounds": args.rounds,
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                "minutes": round((time.time() - started) / 60, 1),
            "command": "make bench-startup" + (f" BENCH_STARTUP_ARGS='{' '.join(shown)}'" if shown else ""),
            "versions": [v for v, _ in versions]}
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
        args.out.write_text(render(meta, runs))
        print(f"bench-startup: wrote {args.out}")
        med = {v: statistics.median(r["ready_s"] for r in runs if r["version"] == v) for v, _ in versions}
        print("median launch -> attached: " + ", ".join(f"{v} {m:.2f} s" for v, m in med.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
