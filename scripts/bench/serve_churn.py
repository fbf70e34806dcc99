#!/usr/bin/env python3
"""`make bench-serve`: `accept-watch serve` under --max-requests churn, memory and series over time.

A real gunicorn (4 sync workers, --max-requests 50: a new worker every ~50 connections) and a real nginx
(2 workers) are loaded at fixed rates for --duration seconds while one `accept-watch serve` watches both
with a short retention (exited workers folded and their kernel entries deleted during the run). Every
--sample seconds: the daemon's RSS (VmRSS and its anonymous part), the number of pid-labelled series on
/metrics, worker records in the documents, kernel entries pruned so far. At the end the counts are
compared with the servers' own records (gunicorn: the app's per-pid records; nginx: its access log).
Writes JSON and a Markdown table (--out-dir, default docs/: bench-serve.json, bench-serve.md).

    .venv/bin/python scripts/bench/serve_churn.py --duration 600
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from accept_watch.daemon.loadgen import LoadGenerator  # noqa: E402
from tests import servers  # noqa: E402
from tests.servewatch import start_nginx_at, start_serve  # noqa: E402
from tests.watcher import free_port  # noqa: E402


def _rss(pid: int) -> tuple[int, int]:
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                vals[key] = int(rest.split()[0]) * 1024
    return vals.get("VmRSS", 0), vals.get("RssAnon", 0)


def run(duration: float, sample: float, gunicorn_rate: float, nginx_rate: float, work: Path) -> dict:
    web, gport, nport = free_port(), free_port(), free_port()
    pidfile = work / "gunicorn.pid"
    g = servers.start_gunicorn(workers=4, port=gport, max_requests=50, extra_args=["--pid", str(pidfile)])
    n = start_nginx_at(nport, workers=2)
    serve = start_serve(work, "--pidfile", f"web={pidfile}", "--port", f"nginx={nport}", "--retention", "10",
                        web=web)
    loads = [LoadGenerator("127.0.0.1", gport, concurrency=2, rate_per_s=gunicorn_rate).start(),
             LoadGenerator("127.0.0.1", nport, concurrency=2, rate_per_s=nginx_rate).start()]
    samples = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < duration:
            time.sleep(sample)
            vm, anon = _rss(serve.proc.pid)
            series = serve.samples("accept_watch_worker_accepts_total")
            docs = {name: serve.document(name) for name in ("web", "nginx")}
            samples.append({
                "t_s": round(time.monotonic() - started, 1), "rss_mb": round(vm / 2**20, 1),
                "anon_mb": round(anon / 2**20, 1), "pid_series": len(series),
                "worker_records": sum(len(d["workers"]) for d in docs.values()),
                "accepts": sum(d["total_accepts"] for d in docs.values()),
                "pruned": serve.value("accept_watch_pruned_workers_total") or 0,
                "evicted_workers": sum(d["diagnostics"]["evicted_workers"] for d in docs.values()),
            })
            print(json.dumps(samples[-1]), flush=True)
    finally:
        for load in loads:
            load.stop()
        time.sleep(2)
        final = {name: serve.document(name) for name in ("web", "nginx")}
        code = serve.stop()
        g.close()
        n.close()
    truth = {"web": sum(g.ground_truth().values()), "nginx": len(n.records())}
    return {
        "duration_s": duration, "rates_per_s": {"web": gunicorn_rate, "nginx": nginx_rate},
        "exit_code": code, "samples": samples,
        "counted": {k: d["total_accepts"] for k, d in final.items()}, "truth": truth,
        "unattributed": {k: d["unattributed"] for k, d in final.items()},
        "exact": all(final[k]["total_accepts"] == truth[k] for k in truth),
        "loadavg_at_end": os.getloadavg(),
    }


def render(result: dict) -> str:
    s = result["samples"]
    lines = [
        "# accept-watch serve under --max-requests churn", "",
        f"gunicorn (4 workers, --max-requests 50) at {result['rates_per_s']['web']:g}/s and nginx "
        f"(2 workers) at {result['rates_per_s']['nginx']:g}/s for {result['duration_s']:g} s, "
        "one `accept-watch serve`, retention 10 s. Counted vs the servers' own records: "
        + ", ".join(f"{k} {result['counted'][k]} / {result['truth'][k]}" for k in result["truth"])
        + f" ({'exact' if result['exact'] else 'NOT exact'}); unattributed {result['unattributed']}.", "",
        "| t (s) | RSS MB | anon MB | pid series | worker records | accepts | evicted workers "
        "| kernel entries pruned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {x['t_s']} | {x['rss_mb']} | {x['anon_mb']} | {x['pid_series']} | {x['worker_records']} | "
              f"{x['accepts']} | {x['evicted_workers']} | {x['pruned']:g} |" for x in s]
    if "loadavg_at_end" in result:
        lines += ["", f"Load average at the end: {', '.join(f'{x:.1f}' for x in result['loadavg_at_end'])} "
                  f"on {os.cpu_count()} CPUs (on a shared machine RSS includes library pages others map; "
                  "anon is the daemon's own)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--sample", type=float, default=10.0)
    p.add_argument("--gunicorn-rate", type=float, default=200.0)
    p.add_argument("--nginx-rate", type=float, default=500.0)
    p.add_argument("--out-dir", type=Path, default=REPO / "docs")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("serve_churn: run as root (eBPF)", file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory(prefix="aw-bench-serve-") as tmp:
        result = run(args.duration, args.sample, args.gunicorn_rate, args.nginx_rate, Path(tmp))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench-serve.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / "bench-serve.md").write_text(render(result))
    print(render(result))
    return 0 if result["exact"] and result["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
