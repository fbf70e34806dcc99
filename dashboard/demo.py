"""A synthetic DashboardSource: accept-watch/1 documents from simulated traffic, no kernel involved.

Used by the dashboard tests and to preview the page (`python -m accept_watch.dashboard.demo`). Time is
simulated and only moves on advance(), so tests decide exactly when the document changes; the same
seed gives the same documents.
"""

from __future__ import annotations

import argparse
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from accept_watch.probes.histogram import bucket_bounds, bucket_index, percentile
from accept_watch.probes.records import Counter as DiagCounter

HISTORY = 300  # seconds of rate/depth history kept, as in the daemon's document
BACKLOG_LIMIT = 2048


class SyntheticSource:
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
        self.probe = probe
        # Zipf-like weights in a shuffled order: some workers win more often, as with epoll wake-ups.
        order = self.pids[:]
        self._rng.shuffle(order)
        self._weight = {pid: 1.0 / (rank + 1) ** skew for rank, pid in enumerate(order)}
        self._alive = set(self.pids)
        self._started = datetime.now(UTC).replace(microsecond=0)
        self._t = 0.0
        self._accepts: Counter[int] = Counter()
        self._port_accepts: Counter[int] = Counter()
        self._hist: dict[int, Counter[int]] = {pid: Counter() for pid in self.pids}
        self._wait_sum: Counter[int] = Counter()
        self._wait_max: Counter[int] = Counter()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._per_second: deque[tuple[float, dict[int, int]]] = deque(maxlen=HISTORY)
        self._depth: dict[int, deque[tuple[float, int]]] = {p: deque(maxlen=HISTORY) for p in self.ports}
        self._depth_now: dict[int, int] = dict.fromkeys(self.ports, 0)
        self._depth_max: dict[int, int] = dict.fromkeys(self.ports, 0)
        self._prev: dict[int, int] = {}
        self._transitions: Counter[tuple[int, int, int]] = Counter()
        self._diag = {c: 0 for c in DiagCounter}
        self._events: deque[dict] = deque(maxlen=1000)
        self._analysis: dict = {}
        self._ended: datetime | None = None

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

    def add_losses(self, lost_events: int = 0, unattributed: int = 0) -> None:
        with self._lock:
            self._diag[DiagCounter.EVENTS_LOST] += lost_events
            self._diag[DiagCounter.FD_WALK_FAILED] += unattributed

    def set_analysis(self, analysis: dict) -> None:
        with self._lock:
            self._analysis = dict(analysis)

    def end(self) -> None:
        with self._lock:
            self._ended = self._wall(self._t)

    # ---- DashboardSource ----------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            return self._document()

    def recent_events(self, limit: int) -> list[dict]:
        with self._lock:
            return list(self._events)[-limit:] if limit > 0 else []

    # ---- simulation -----------------------------------------------------------------------------
    def _wall(self, t: float) -> datetime:
        return self._started + timedelta(seconds=t)

    def _tick(self) -> None:
        self._t += 1.0
        t = self._t
        alive = sorted(self._alive)
        counts: Counter[int] = Counter()
        if alive:
            # Traffic breathes slowly so the charts have something to show.
            n = max(0, round(self.rate * (1 + 0.4 * math.sin(t / 25)) + self._rng.gauss(0, self.rate * 0.05)))
            winners = self._rng.choices(alive, weights=[self._weight[p] for p in alive], k=n)
            for pid in winners:
                port = self._rng.choice(self.ports)
                self._accept(t, pid, port)
                counts[pid] += 1
        self._per_second.append((t, dict(counts)))
        for port in self.ports:
            depth = max(0, round(self._rng.gauss(len(counts) / 4, 1.5)))
            self._depth_now[port] = depth
            self._depth_max[port] = max(self._depth_max[port], depth)
            self._depth[port].append((t, depth))

    def _accept(self, t: float, pid: int, port: int) -> None:
        wait_ns = int(self._rng.lognormvariate(math.log(60_000 * (1 + 3 * self._weight[pid])), 0.7))
        self._accepts[pid] += 1
        self._port_accepts[port] += 1
        self._hist[pid][bucket_index(wait_ns)] += 1
        self._wait_sum[pid] += wait_ns
        self._wait_max[pid] = max(self._wait_max[pid], wait_ns)
        self._first.setdefault(pid, t)
        self._last[pid] = t
        prev = self._prev.get(port)
        if prev is not None:
            self._transitions[(port, prev, pid)] += 1
        self._prev[port] = pid
        self._events.append(
            {
                "ts": self._wall(t).isoformat(),
                "pid": pid,
                "tid": pid,
                "comm": "gunicorn",
                "family": "ipv4",
                "local_addr": "127.0.0.1",
                "local_port": port,
                "peer_addr": "127.0.0.1",
                "peer_port": self._rng.randint(32768, 60999),
                "queue_wait_us": wait_ns / 1000,
                "backlog": self._depth_now[port],
                "backlog_limit": BACKLOG_LIMIT,
                "listener_inode": self._inode(port),
                "source": "syscall_exit",
            }
        )

    def _inode(self, port: int) -> int:
        return 40_000 + self.ports.index(port)

    def _rate(self, pid: int, window: int) -> float:
        recent = list(self._per_second)[-window:]
        if not recent:
            return 0.0
        return sum(c.get(pid, 0) for _, c in recent) / len(recent)

    def _worker(self, pid: int, total: int) -> dict:
        hist = self._hist[pid]
        count = sum(hist.values())
        accepts = self._accepts[pid]

        def us(value: float | None) -> float | None:
            return None if value is None else round(value / 1000, 3)

        return {
            "pid": pid,
            "ppid": self.master_pid,
            "cmdline": "gunicorn: worker [app:app]",
            "role": "worker",
            "accepts": accepts,
            "share": accepts / total if total else 0.0,
            "alive": pid in self._alive,
            "first_seen": self._wall(self._first[pid]).isoformat() if pid in self._first else None,
            "last_seen": self._wall(self._last[pid]).isoformat() if pid in self._last else None,
            "rate": {"1s": self._rate(pid, 1), "10s": self._rate(pid, 10), "60s": self._rate(pid, 60)},
            "queue_wait_us": {
                "p50": us(percentile(hist, 50)),
                "p99": us(percentile(hist, 99)),
                "max": us(self._wait_max[pid]) if count else None,
                "mean": us(self._wait_sum[pid] / count) if count else None,
                "count": count,
            },
            "queue_wait_hist": [[*bucket_bounds(i), hist[i]] for i in sorted(hist) if hist[i]],
        }

    def _document(self) -> dict:
        total = sum(self._accepts.values())
        lost = self._diag[DiagCounter.EVENTS_LOST]
        unattributed = self._diag[DiagCounter.STATS_MAP_FULL] + self._diag[DiagCounter.FD_WALK_FAILED]
        now = self._ended or self._wall(self._t)
        return {
            "schema": "accept-watch/1",
            "tool_version": "0.1.0",
            "master_pid": self.master_pid,
            "master_cmdline": f"gunicorn -w {len(self.pids)} app:app",
            "probe": self.probe,
            "probe_detail": "synthetic source (no kernel): simulated traffic for previews and tests",
            "backstop": {"state": "not used", "pending_at_attach": 0, "retired_after_s": None},
            "kernel": "synthetic",
            "started_at": self._started.isoformat(),
            "updated_at": now.isoformat(),
            "ended_at": self._ended.isoformat() if self._ended else None,
            "duration_s": self._t,
            "total_accepts": total,
            "lost_events": lost,
            "unattributed": unattributed,
            "diagnostics": {c.name.lower(): v for c, v in self._diag.items()},
            "listeners": [
                {
                    "address": "127.0.0.1",
                    "port": port,
                    "family": "ipv4",
                    "inode": self._inode(port),
                    "mode": "shared",
                    "pids": sorted(self._alive),
                    "accepts": self._port_accepts[port],
                    "queue_depth": {
                        "current": self._depth_now[port],
                        "max": self._depth_max[port],
                        "limit": BACKLOG_LIMIT,
                    },
                    "depth_history": [[t, d] for t, d in self._depth[port]],
                }
                for port in self.ports
            ],
            "workers": [self._worker(pid, total) for pid in self.pids],
            "rate_history": [[t, {str(p): n for p, n in sorted(c.items())}] for t, c in self._per_second],
            "transitions": [
                {"port": port, "from": a, "to": b, "count": n}
                for (port, a, b), n in sorted(self._transitions.items())
            ],
            "analysis": dict(self._analysis),
        }


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
