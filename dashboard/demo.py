"""A synthetic DashboardSource: simulated kernel counters through the real aggregator and analysis.

Used by the dashboard tests and to preview the page (`python -m accept_watch.dashboard.demo`). Time is
simulated and only moves on advance(), so tests decide exactly when the document changes; the same
seed gives the same documents.
"""

from __future__ import annotations

import argparse
import math
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from accept_watch.daemon.analysis import analyzed
from accept_watch.daemon.discovery import Listener, ProcessInfo, Topology
from accept_watch.daemon.document import Document
from accept_watch.daemon.stats import Aggregator
from accept_watch.probes.histogram import bucket_index
from accept_watch.probes.records import (
    AcceptEvent,
    DiagCounter,
    EventSource,
    KernelSnapshot,
    ListenerCounters,
    WorkerCounters,
)

BACKLOG_LIMIT = 2048
_S = 1_000_000_000
_START_NS = 1_000 * _S  # simulated CLOCK_MONOTONIC at the start


# Fields like daemon/stats.py's _Raw by design: both mirror the kernel's per-worker counters (one
# simulates them, the other sums them); data, not logic to share.
@dataclass(slots=True)
class _Cell:
    """What the kernel would count for one (worker, port): cumulative, like the BPF maps."""

    accepts: int = 0
    first_ns: int = 0
    last_ns: int = 0
    wait_sum_ns: int = 0
    wait_max_ns: int = 0
    first_seq: int = 0  # the port's accept sequence number at the first and last accept
    last_seq: int = 0
    hist: Counter[int] = field(default_factory=Counter)


class SyntheticSource:
    """Simulated kernel counters fed to the real Aggregator, analysed by the real analysis: the
    documents are built exactly as the daemon builds them."""

    def __init__(
        self,
        workers: int = 8,
        *,
        seed: int = 1,
        ports: Sequence[int] = (8000,),
        rate: float = 80.0,
        skew: float = 0.8,
        master_pid: int = 4100,
        probe: str = "tracepoint",
    ) -> None:
        if not 1 <= workers <= 4096:
            raise ValueError(f"workers must be 1..4096, got {workers}")
        if not ports:
            raise ValueError("at least one port is needed")
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.master_pid = master_pid
        self.pids = [master_pid + 1 + i for i in range(workers)]
        self.ports = list(ports)
        self.rate = rate
        # Zipf-like weights in a shuffled order: some workers win more often, as with epoll wake-ups.
        order = self.pids[:]
        self._rng.shuffle(order)
        self._weight = {pid: 1.0 / (rank + 1) ** skew for rank, pid in enumerate(order)}
        self._alive = set(self.pids)
        self._now = _START_NS
        started = datetime.now(UTC).replace(microsecond=0)
        self._cells: dict[tuple[int, int], _Cell] = {}
        self._listener_accepts: Counter[int] = Counter()
        self._depth_max: dict[int, int] = dict.fromkeys(self.ports, 0)
        self._depth_now: dict[int, int] = dict.fromkeys(self.ports, 0)
        self._prev: dict[int, int] = {}
        self._transitions: Counter[tuple[int, int, int]] = Counter()
        self._diag = {c: 0 for c in DiagCounter}
        self._modes = {pid: {"mode": "epoll", "detail": "synthetic: epoll_wait on the listener"}
                       for pid in self.pids}
        self._override: dict | None = None
        self._ended = False
        self._doc: Document | None = None
        self._agg = Aggregator(
            self._topology(), probe, "synthetic source (no kernel): simulated traffic for previews and tests",
            "synthetic", wall_clock=lambda: int(started.timestamp() * _S) + self._now - _START_NS,
            mono_clock=lambda: self._now, process_lookup=lambda pid: None, history_points=300)
        self._agg.backstop = {"state": "not used", "pending_at_attach": 0, "retired_after_s": None}

    # ---- what tests and the preview drive -------------------------------------------------------
    def advance(self, seconds: int = 1) -> None:
        """Simulate `seconds` more seconds of traffic."""
        with self._lock:
            for _ in range(seconds):
                self._tick()

    def exit_worker(self, pid: int) -> None:
        with self._lock:
            if pid not in self._weight:
                raise ValueError(f"no worker with pid {pid}")
            self._alive.discard(pid)
            self._update()

    def add_losses(self, lost_events: int = 0, unattributed: int = 0) -> None:
        with self._lock:
            self._diag[DiagCounter.EVENTS_LOST] += lost_events
            self._diag[DiagCounter.FD_WALK_FAILED] += unattributed
            self._update()

    def set_analysis(self, analysis: dict) -> None:
        """Show this analysis section instead of the computed one (what another daemon might say)."""
        with self._lock:
            self._override = dict(analysis)
            self._doc = None

    def end(self) -> None:
        with self._lock:
            self._ended = True
            self._doc = None

    # ---- DashboardSource ----------------------------------------------------------------------
    def model(self) -> Document:
        with self._lock:
            if self._doc is None:
                doc = analyzed(self._agg.model(ended=self._ended), self._modes)
                self._doc = doc if self._override is None else doc.with_analysis(self._override)
            return self._doc

    def snapshot(self) -> dict:
        # A copy of the top level: callers (tests) may pop keys; the document itself is shared.
        return dict(self.model().to_dict())

    def recent_events(self, limit: int) -> list[dict]:
        return self._agg.recent_events(limit) if limit > 0 else []

    # ---- simulation -----------------------------------------------------------------------------
    def _topology(self) -> Topology:
        procs = {self.master_pid: ProcessInfo(self.master_pid, 1, f"gunicorn -w {len(self.pids)} app:app",
                                              1.0, "master")}
        procs |= {p: ProcessInfo(p, self.master_pid, "gunicorn: worker [app:app]", 1.0, "worker")
                  for p in sorted(self._alive)}
        holders = [self.master_pid, *sorted(self._alive)]
        listeners = [Listener(self._inode(port), "ipv4", "127.0.0.1", port, holders, "shared")
                     for port in self.ports]
        return Topology(self.master_pid, procs[self.master_pid].cmdline, procs, listeners)

    def _tick(self) -> None:
        start = self._now
        self._now += _S
        t = (self._now - _START_NS) / _S
        alive = sorted(self._alive)
        busy: Counter[int] = Counter()
        if alive:
            # Traffic breathes slowly so the charts have something to show.
            n = max(0, round(self.rate * (1 + 0.4 * math.sin(t / 25)) + self._rng.gauss(0, self.rate * 0.05)))
            winners = self._rng.choices(alive, weights=[self._weight[p] for p in alive], k=n)
            for i, pid in enumerate(winners):
                busy[pid] += 1
                self._accept(start + (i + 1) * _S // (n + 1), pid, self._rng.choice(self.ports))
        for port in self.ports:
            depth = max(0, round(self._rng.gauss(len(busy) / 4, 1.5)))
            self._depth_now[port] = depth
            self._depth_max[port] = max(self._depth_max[port], depth)
        self._update()

    def _accept(self, ts_ns: int, pid: int, port: int) -> None:
        wait_ns = int(self._rng.lognormvariate(math.log(60_000 * (1 + 3 * self._weight[pid])), 0.7))
        cell = self._cells.setdefault((pid, port), _Cell())
        cell.accepts += 1
        cell.first_ns = cell.first_ns or ts_ns
        cell.last_ns = ts_ns
        cell.wait_sum_ns += wait_ns
        cell.wait_max_ns = max(cell.wait_max_ns, wait_ns)
        cell.hist[bucket_index(wait_ns)] += 1
        self._listener_accepts[port] += 1
        cell.first_seq = cell.first_seq or self._listener_accepts[port]
        cell.last_seq = self._listener_accepts[port]
        self._transitions[(port, self._prev.get(port, 0), pid)] += 1
        self._prev[port] = pid
        self._agg.add_event(AcceptEvent(
            ts_ns, pid, pid, "gunicorn", socket.AF_INET, "127.0.0.1", port, "127.0.0.1",
            self._rng.randint(32768, 60999), wait_ns, self._depth_now[port], BACKLOG_LIMIT,
            self._inode(port), EventSource.SYSCALL_EXIT))

    def _update(self) -> None:
        snap = KernelSnapshot(
            self._now,
            tuple(WorkerCounters(pid, port, c.accepts, c.first_ns, c.last_ns, c.accepts, c.wait_sum_ns,
                                 c.wait_max_ns, closed=c.accepts, first_seq=c.first_seq, last_seq=c.last_seq)
                  for (pid, port), c in sorted(self._cells.items())),
            {key: dict(c.hist) for key, c in self._cells.items()},
            tuple(ListenerCounters(self._inode(port), port, self._listener_accepts[port],
                                   self._depth_max[port], BACKLOG_LIMIT) for port in self.ports),
            dict(self._transitions),
            dict(self._diag),
        )
        topology = self._topology()
        self._agg.update(snap, topology, {self._inode(p): self._depth_now[p] for p in self.ports},
                         alive=set(topology.processes))
        self._doc = None

    def _inode(self, port: int) -> int:
        return 40_000 + self.ports.index(port)


def main(argv: Sequence[str] | None = None) -> None:
    from accept_watch.dashboard.server import DashboardServer

    parser = argparse.ArgumentParser(
        description="Serve the dashboard on simulated traffic (no kernel needed)."
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--warmup", type=int, default=120, help="simulated seconds before serving")
    args = parser.parse_args(argv)
    source = SyntheticSource(args.workers)
    source.advance(args.warmup)
    with DashboardServer(source, args.host, args.port) as server:
        print(f"synthetic dashboard at {server.url}  (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(1)
                source.advance(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
