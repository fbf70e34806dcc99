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

    .venv/bin/python -m scripts.bench                 the full benchmark (~15 min on 2 cores)
    .venv/bin/python -m scripts.bench --quick --out-dir /tmp/b   a smoke test of the driver (~2 min)
    .venv/bin/python -m scripts.bench --render-only docs/benchmarks.json   rewrite the .md only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import before, benchdoc, bpfstats, issue14, loopback, target_verdicts
from .common import (
    DISTURBED_PCT,
    PY_SPY,
    QUIET_CORES,
    SETTLE_S,
    BenchError,
    log,
    now_iso,
    wait_quiet,
)
from .modes import BEFORE_MODES, MODES, PAUSED
from .procstat import (
    loadavg,
    machine,
    time_wait_sockets,
)
from .rounds import profile_run, run_workload
from .servers import REPO, VENV_BIN, ServerError, free_port
from .startup_long import long_run, measure_startup
from .tools import (
    ToolError,
    repo_commit,
    version_of,
)

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
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0])
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
        results["targets"] = target_verdicts.evaluate_targets(results)  # with the current evaluation code
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
        "command": "make bench  (= .venv/bin/python -m scripts.bench"
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
        results["targets"] = [] if args.modes else target_verdicts.evaluate_targets(results)
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
