"""Exports for the `report` tests, written by the daemon's own document builder (stats.Aggregator) fed
with simulated kernel snapshots of a pre-fork server: round-robin (FIFO wake-up), concentrated (LIFO
wake-up), hash spread, idle, with 1 to 256 workers; and the ways the tests run `report`."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from accept_watch.daemon import analysis, cli
from accept_watch.daemon.discovery import Listener, ProcessInfo, Topology
from accept_watch.daemon.stats import Aggregator
from accept_watch.probes.histogram import bucket_index
from accept_watch.probes.records import DiagCounter, KernelSnapshot, ListenerCounters, WorkerCounters

MASTER = 4000
PORT = 8000
INODE = 77001
S = 1_000_000_000


# ---------------------------------------------------------------------------------------------------
# Simulated server -> real document builder
# ---------------------------------------------------------------------------------------------------


def _next_pid(pattern: str, pids: list[int], last: int | None, i: int, rng: random.Random) -> int:
    if pattern == "fifo":  # workers blocked in accept(): woken in turn
        return pids[i % len(pids)]
    if pattern == "lifo":  # epoll: the worker that just accepted tends to win again
        if last is not None and rng.random() < 0.7:
            return last
        return pids[min(int(rng.expovariate(0.5)), len(pids) - 1)]
    if pattern == "hash":  # SO_REUSEPORT: independent draws
        return rng.choice(pids)
    raise ValueError(pattern)


def simulate(workers: int = 8, pattern: str = "fifo", seconds: int = 40, rate: int = 150, *,
             inflight: bool = True, seed: int = 1, unattributed: int = 0, lost: int = 0,
             wait_modes: dict[int, str] | None = None) -> dict[str, Any]:
    """An export as accept-watch writes it, from a simulated run: the load alternates between light and
    heavy phases every 10 s; queue waits are log-normal (~60 us, slower under heavy load)."""
    rng = random.Random(seed)
    pids = [MASTER + 1 + i for i in range(workers)]
    procs = {MASTER: ProcessInfo(MASTER, 1, "gunicorn: master [app:app]", 1.0, "master")}
    procs |= {p: ProcessInfo(p, MASTER, "gunicorn: worker [app:app]", 1.0, "worker") for p in pids}
    topo = Topology(MASTER, f"gunicorn -w {workers} -b 127.0.0.1:{PORT} app:app", procs,
                    [Listener(INODE, "ipv4", "127.0.0.1", PORT, [MASTER, *pids], "shared")])
    clock = [10 * S]
    agg = Aggregator(topo, "tracepoint", "syscalls:sys_exit_accept4 tracepoints", "6.18.0-test",
                     wall_clock=lambda: 1_790_000_000 * S, mono_clock=lambda: clock[0],
                     process_lookup=lambda pid: None)
    acc = dict.fromkeys(pids, 0)
    first: dict[int, int] = {}
    last_ns: dict[int, int] = {}
    wsum = dict.fromkeys(pids, 0)
    wmax = dict.fromkeys(pids, 0)
    hist: dict[tuple[int, int], dict[int, int]] = {}
    trans: dict[tuple[int, int, int], int] = {}
    imax = dict.fromkeys(pids, 1 if inflight else 0)
    busy = dict.fromkeys(pids, 0)
    depth_max = 0
    prev: int | None = None
    i = 0
    for sec in range(1, seconds + 1):
        heavy = (sec // 10) % 2 == 1
        n = 0 if pattern == "idle" else int(rate * (3 if heavy else 1) * rng.uniform(0.8, 1.2))
        for k in range(n):
            pid = _next_pid(pattern, pids, prev, i, rng)
            now = clock[0] + int(S * (k + 1) / (n + 1))
            wait = int(rng.lognormvariate(math.log(60_000 * (8 if heavy else 1)), 0.9))
            acc[pid] += 1
            first.setdefault(pid, now)
            last_ns[pid] = now
            wsum[pid] += wait
            wmax[pid] = max(wmax[pid], wait)
            b = hist.setdefault((pid, PORT), {})
            b[bucket_index(wait)] = b.get(bucket_index(wait), 0) + 1
            trans[(PORT, prev or 0, pid)] = trans.get((PORT, prev or 0, pid), 0) + 1
            if inflight and heavy and pattern == "lifo" and rng.random() < 0.3:
                busy[pid] += 1
                imax[pid] = max(imax[pid], 2 + int(rng.expovariate(0.3)))
            prev = pid
            i += 1
        depth_max = max(depth_max, int(rng.expovariate(0.2)) if heavy else 1)
        clock[0] += S
        wcs = tuple(
            WorkerCounters(p, PORT, acc[p], first.get(p, 0), last_ns.get(p, 0), acc[p], wsum[p], wmax[p],
                           inflight=1 if inflight and acc[p] else 0, inflight_max=imax[p],
                           busy_accepts=busy[p],
                           closed=max(0, acc[p] - 1) if inflight else 0,
                           life_sum_ns=max(0, acc[p] - 1) * 3_000_000 if inflight else 0,
                           life_max_ns=40_000_000 if inflight and acc[p] else 0)
            for p in pids if acc[p] or first.get(p)
        )
        snap = KernelSnapshot(
            clock[0], wcs, {k: dict(v) for k, v in hist.items()},
            (ListenerCounters(INODE, PORT, sum(acc.values()), depth_max, 2048),),
            dict(trans), {DiagCounter.EVENTS_LOST: lost, DiagCounter.STATS_MAP_FULL: unattributed},
        )
        agg.update(snap, topo, {INODE: rng.randint(0, 3)})
        if inflight and heavy and pattern == "lifo":
            agg.note_blocked({max(busy, key=lambda p: busy[p]): 3})  # what daemon/blocked.py would see
    doc = agg.document(ended=True)
    if not inflight:
        for w in doc["workers"]:
            del w["inflight"]
    stored_modes = {p: {"mode": m, "detail": ""} for p, m in (wait_modes or {}).items()}
    doc["analysis"] = analysis.analyze(doc, stored_modes)  # what the daemon's analysis hook stores
    return doc


def write(tmp_path: Path, doc: Any, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed entry point's code path, in a fresh interpreter (so a traceback would show)."""
    return subprocess.run([sys.executable, "-m", "accept_watch.daemon.cli", "report", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "120"})


def run_inproc(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(["report", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def squash(text: str) -> str:
    return " ".join(text.split())


ROUND_ROBIN = dict(workers=8, pattern="fifo")
CONCENTRATED = dict(workers=8, pattern="lifo")
MANY = dict(workers=256, pattern="hash", rate=400, seconds=30)
IDLE = dict(workers=4, pattern="idle", seconds=5)


def all_patterns() -> dict[str, dict[str, Any]]:
    """One export per server pattern the report tests read."""
    return {
        "round-robin": simulate(**ROUND_ROBIN),
        "concentrated": simulate(**CONCENTRATED),
        "many": simulate(**MANY),
        "single": simulate(workers=1, pattern="hash", seconds=20),
        "idle": simulate(**IDLE),
    }


VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col"}


class StrictChecker(HTMLParser):
    """Every non-void element closed in order; <svg> counted by data-plot; any parser complaint kept."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.plots: list[str] = []
        self.titles = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            self.plots.append(dict(attrs).get("data-plot") or "")
        self.titles += tag == "title"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            self.errors.append("self-closed <svg/>")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            self.errors.append(f"end tag for void <{tag}>")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-3:]}")
        else:
            self.stack.pop()


def check_page(page: str) -> StrictChecker:
    checker = StrictChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == [], (checker.errors, checker.stack[-5:])
    # Self-contained: no URL of any kind (the SVG namespace is the one the brief tolerates), no script,
    # nothing fetched.
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    for needle in ("<script", " src=", " href=", "url(", "@import", "<link", "<iframe"):
        assert needle not in page.lower(), needle
    return checker
