#!/usr/bin/env python3
"""`make bench-serve`: `accept-watch serve` under --max-requests churn, memory and series over time.

A real gunicorn (4 sync workers, --max-requests 50: a new worker every ~50 connections) paced at
--gunicorn-rate, and a real nginx (2 workers) driven by wrk as fast as it answers (one connection
per request, `Connection: close`), both watched by one `accept-watch serve` with a short retention
(exited workers folded and their kernel entries deleted during the run). The run ends when the two
servers have taken --connections connections together (1 M by default), or after --max-duration.
Every --sample seconds: the daemon's RSS (VmRSS and its anonymous part), how many series /metrics
holds (all of them, and the pid-labelled ones), worker records in the documents, kernel entries pruned.
At the end the counts are compared with the servers' own records (gunicorn: the app's per-pid
records; nginx: its access log, per worker pid). "Flat" is judged on the second half of the run
against stated tolerances (see TOLERANCE). Writes docs/bench-serve.json and docs/bench-serve.md.

    .venv/bin/python scripts/bench/serve_churn.py --connections 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from demo.loadgen import LoadGenerator  # noqa: E402
from scripts.bench.tools import Load, WrkProcess  # noqa: E402
from tests import realservers, servers  # noqa: E402
from tests.servewatch import start_serve  # noqa: E402
from tests.watcher import free_port  # noqa: E402

RETENTION_S = 10
# Flat: from the middle third of the run to the last third, the daemon's anonymous memory grows by at
# most this many MB (mean against mean) and the number of series on /metrics by at most this fraction.
TOLERANCE = {"anon_mb": 4.0, "series_growth": 0.10}


def _rss(pid: int) -> tuple[int, int]:
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                vals[key] = int(rest.split()[0]) * 1024
    return vals.get("VmRSS", 0), vals.get("RssAnon", 0)


def _series(metrics_text: str) -> tuple[int, int]:
    """(every sample line of accept-watch's own metrics, the pid-labelled ones)."""
    lines = [ln for ln in metrics_text.splitlines() if ln.startswith("accept_watch_")]
    return len(lines), sum(1 for ln in lines if 'pid="' in ln)


def _nginx_per_pid(access_log: Path) -> Counter[int]:
    """nginx's own record, streamed (a million lines): '$pid $msec $connection $server_port'."""
    out: Counter[int] = Counter()
    with open(access_log) as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if head.isdigit():
                out[int(head)] += 1
    return out


def _nginx_with_status(port: int, workers: int = 2) -> realservers.Nginx:
    """tests/servewatch.py's nginx, plus stub_status at /nginx_status: nginx's own count of accepted
    connections, those too that wrk closes without a request when it stops (not in the access log)."""
    workdir = Path(tempfile.mkdtemp(prefix="accept-watch-bench-nginx-"))
    (workdir / "tmp").mkdir()
    conf = workdir / "nginx.conf"
    listens = f"        listen 127.0.0.1:{port};\n        location = /nginx_status {{ stub_status; }}"
    conf.write_text(realservers._NGINX_CONF.format(workers=workers, dir=workdir, accept_mutex="off",
                                                   listens=listens))
    proc = realservers._spawn([realservers.NGINX, "-p", str(workdir), "-c", str(conf), "-e",
                               str(workdir / "error.log")], workdir)
    server = realservers.Nginx(proc, workdir, [port], workers)
    try:
        server._wait_ready(workers, 20)
    except BaseException:
        server.close()
        raise
    return server


def _stub_status(port: int) -> dict[str, int]:
    """'Active connections: 1 / server accepts handled requests / 10 10 10 / ...'"""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/nginx_status", timeout=10) as r:
        lines = r.read().decode().splitlines()
    accepts, handled, requests = (int(x) for x in lines[2].split())
    return {"accepts": accepts, "handled": handled, "requests": requests}


def run(connections: int, max_duration: float, sample: float, gunicorn_rate: float, work: Path) -> dict:
    web, gport, nport = free_port(), free_port(), free_port()
    pidfile = work / "gunicorn.pid"
    g = servers.start_gunicorn(workers=4, port=gport, max_requests=50, extra_args=["--pid", str(pidfile)])
    n = _nginx_with_status(nport, workers=2)
    serve = start_serve(work, "--pidfile", f"web={pidfile}", "--port", f"nginx={nport}", "--retention",
                        str(RETENTION_S), web=web)
    gload = LoadGenerator("127.0.0.1", gport, concurrency=2, rate_per_s=gunicorn_rate).start()
    wrk = WrkProcess(f"http://127.0.0.1:{nport}/", Load("nginx", connections=16), max_duration + 60)
    samples = []
    started = time.monotonic()
    wrk_result = None
    try:
        accepts = 0
        while accepts < connections and time.monotonic() - started < max_duration:
            time.sleep(sample)
            vm, anon = _rss(serve.proc.pid)
            every, pid_series = _series(serve.get("/metrics"))
            docs = {name: serve.document(name) for name in ("web", "nginx")}
            accepts = sum(d["total_accepts"] for d in docs.values())
            samples.append({
                "t_s": round(time.monotonic() - started, 1), "rss_mb": round(vm / 2**20, 1),
                "anon_mb": round(anon / 2**20, 1), "series": every, "pid_series": pid_series,
                "worker_records": sum(len(d["workers"]) for d in docs.values()),
                "accepts": accepts, "web_accepts": docs["web"]["total_accepts"],
                "pruned": serve.value("accept_watch_pruned_workers_total") or 0,
                "evicted_workers": sum(d["diagnostics"]["evicted_workers"] for d in docs.values()),
                "loadavg_1m": round(os.getloadavg()[0], 1),
            })
            print(json.dumps(samples[-1]), flush=True)
    finally:
        wrk_result = wrk.stop()
        gload.stop()
        status = _stub_status(nport)  # after the load: this request is its own last accept
        time.sleep(3)  # the last accepts read
        final = {name: serve.document(name) for name in ("web", "nginx")}
        code = serve.stop()
        g.close()
        n.stop()
        # nginx's own record, read before its directory goes (close() would parse a million records)
        truth_nginx = _nginx_per_pid(n.workdir / "access.log")
        shutil.rmtree(n.workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    truth_web = g.ground_truth()
    counted_nginx = {w["pid"]: w["accepts"] for w in final["nginx"]["workers"] if w["accepts"]}
    # nginx: the total against its own accept counter; per worker pid against its access log, which
    # lacks the connections wrk closed without a request when stopped (nginx's accepts - requests).
    truth = {"web": sum(truth_web.values()), "nginx": status["accepts"]}
    no_request = status["accepts"] - status["requests"]
    per_pid_gap = {pid: counted_nginx.get(pid, 0) - truth_nginx.get(pid, 0)
                   for pid in set(counted_nginx) | set(truth_nginx)}
    return {
        "connections_goal": connections, "elapsed_s": round(elapsed, 1), "max_duration_s": max_duration,
        "rates_per_s": {"web": gunicorn_rate, "nginx": "wrk -t1 -c16, as fast as it answers"},
        "wrk": {"requests": wrk_result.requests, "errors": wrk_result.errors} if wrk_result else None,
        "exit_code": code, "samples": samples, "nginx_status": status,
        "counted": {k: d["total_accepts"] for k, d in final.items()}, "truth": truth,
        "nginx_per_pid": {"counted": {str(k): v for k, v in sorted(counted_nginx.items())},
                          "access_log": {str(k): v for k, v in sorted(truth_nginx.items())},
                          "closed_without_request": no_request},
        "unattributed": {k: d["unattributed"] for k, d in final.items()},
        "exact": (all(final[k]["total_accepts"] == truth[k] for k in truth)
                  and all(gap >= 0 for gap in per_pid_gap.values())
                  and sum(per_pid_gap.values()) == no_request),
        "flat": judge(samples), "loadavg_at_end": os.getloadavg(), "cpus": os.cpu_count(),
    }


def judge(samples: list[dict]) -> dict:
    """Flat or not: the last third of the samples against the middle third (the first third warms up:
    rate history, fair-share windows, allocator arenas). Memory: the anonymous RSS's growth between the
    two thirds' means; series: the same, relative (live workers' series come and go between samples)."""
    third = len(samples) // 3
    if third < 2:
        return {"flat": False, "why": f"{len(samples)} samples: too few to judge"}
    middle, last = samples[third:2 * third], samples[2 * third:]

    def mean(xs: list[dict], key: str) -> float:
        return sum(x[key] for x in xs) / len(xs)

    anon = mean(last, "anon_mb") - mean(middle, "anon_mb")
    series_mid, series_last = mean(middle, "series"), mean(last, "series")
    growth = (series_last - series_mid) / series_mid if series_mid else 0.0
    return {"anon_growth_mb": round(anon, 2), "series_mean": [round(series_mid, 1), round(series_last, 1)],
            "series_growth": round(growth, 3), "series_range": [min(x["series"] for x in samples[third:]),
                                                               max(x["series"] for x in samples[third:])],
            "flat": anon <= TOLERANCE["anon_mb"] and growth <= TOLERANCE["series_growth"],
            "middle_t_s": [middle[0]["t_s"], middle[-1]["t_s"]],
            "last_t_s": [last[0]["t_s"], last[-1]["t_s"]]}


def render(result: dict) -> str:
    s, f = result["samples"], result["flat"]
    total = sum(result["counted"].values())
    lines = [
        "# accept-watch serve under --max-requests churn", "",
        "<!-- Generated by `make bench-serve` (scripts/bench/serve_churn.py). -->", "",
        f"{total:,} connections in {result['elapsed_s']:.0f} s watched by one `accept-watch serve` "
        f"(retention {RETENTION_S} s): a gunicorn (4 sync workers, `--max-requests 50`, a new worker "
        f"every ~50 connections) paced at {result['rates_per_s']['web']:g}/s, and an nginx (2 workers) "
        "driven by wrk as fast as it answers, one connection per request. Counted vs the servers' own "
        "records: "
        + ", ".join(f"{k} {result['counted'][k]:,} / {result['truth'][k]:,}" for k in result["truth"])
        + f" ({'exact' if result['exact'] else 'NOT exact'}, nginx per worker pid too); unattributed "
        f"{result['unattributed']}; wrk errors {(result.get('wrk') or {}).get('errors')}.", "",
        f"**Flat: {'yes' if f.get('flat') else 'NO'}.** From the middle third of the run "
        f"({f.get('middle_t_s')} s) to the last third ({f.get('last_t_s')} s), mean against mean: the "
        f"daemon's anonymous memory grew {f.get('anon_growth_mb')} MB "
        f"(tolerance {TOLERANCE['anon_mb']:g} MB); "
        f"the series on /metrics went {f.get('series_mean')} ({f.get('series_growth')}, tolerance "
        f"+{TOLERANCE['series_growth']:.0%}; range after warm-up {f.get('series_range')}: live workers' "
        "series come and go between two samples). "
        f"{f.get('why', '')}", "",
        f"nginx's own counters at the end: {result['nginx_status']}; per worker pid, accept-watch vs the "
        f"access log: {result['nginx_per_pid']['counted']} vs {result['nginx_per_pid']['access_log']} "
        f"(the difference, {result['nginx_per_pid']['closed_without_request']} = nginx's accepts - requests, "
        "is the connections wrk closed without a request when it was stopped: accepted, never logged).", "",
        "| t (s) | load 1m | RSS MB | anon MB | series | pid series | worker records | accepts | web accepts "
        "| evicted workers | kernel entries pruned |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {x['t_s']} | {x['loadavg_1m']} | {x['rss_mb']} | {x['anon_mb']} | {x['series']} | "
              f"{x['pid_series']} | {x['worker_records']} | {x['accepts']} | {x['web_accepts']} | "
              f"{x['evicted_workers']} | {x['pruned']:g} |" for x in s]
    lines += ["", f"Machine: {result['cpus']} CPUs (a VM), shared with other jobs: the load average column "
              "is the whole machine's. RSS includes the LLVM/clang pages other processes map too; the "
              "anonymous part is the daemon's own.", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=1_000_000, help="stop after this many (1000000)")
    p.add_argument("--max-duration", type=float, default=1800.0, help="or after this many seconds (1800)")
    p.add_argument("--sample", type=float, default=15.0)
    p.add_argument("--gunicorn-rate", type=float, default=200.0)
    p.add_argument("--out-dir", type=Path, default=REPO / "docs")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("serve_churn: run as root (eBPF)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="aw-bench-serve-") as tmp:
        result = run(args.connections, args.max_duration, args.sample, args.gunicorn_rate, Path(tmp))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench-serve.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / "bench-serve.md").write_text(render(result))
    print(render(result))
    reached = sum(result["counted"].values()) >= args.connections
    return 0 if result["exact"] and result["exit_code"] == 0 and result["flat"]["flat"] and reached else 1


if __name__ == "__main__":
    sys.exit(main())
