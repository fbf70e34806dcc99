"""Fair shares over the workers able to accept at each moment.

A worker's fair share is not 1/n of the run's accepts: workers come and go (max-requests recycling,
reloads, a killed worker respawned), and one that lived for a tenth of the run is owed a tenth as
much. So at every read of the kernel counters (about once a second), the accepts of that interval
are owed evenly to the workers live during it; summed, that is each worker's expected count.

Live during an interval: a worker (daemon/roles.py) alive at the interval's start and at its end, or
one that accepted during it. The same live sets give the baseline for "the same worker twice in a
row": with independent draws, the chance is sum(p_i^2) over the workers live at that moment, p_i
each worker's strength (its accepts over its expected count) normalised over that set.

Everything is bounded: per-pid entries follow the aggregator's worker records (an evicted worker is
folded into one "exited" entry, pid 0), and at most MAX_EPOCHS distinct live sets are kept with
their transition counts (beyond that the smallest fold into an even-split baseline).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_EPOCHS = 256
EXITED = 0  # pid key under which evicted workers' figures are folded


@dataclass(slots=True)
class PortShares:
    expected: dict[int, float] = field(default_factory=dict)
    observed: dict[int, int] = field(default_factory=dict)
    # frozenset(live pids) -> transitions with a known predecessor that happened while it was live
    epochs: dict[frozenset[int], int] = field(default_factory=dict)
    folded_transitions: int = 0
    folded_q: float = 0.0  # sum of transitions / |live set| of folded epochs (even-split baseline)
    live_min: int | None = None
    live_max: int | None = None
    live_time: float = 0.0  # sum of |live set| * interval seconds
    time: float = 0.0

    def add_interval(self, live: Iterable[int], accepts: Mapping[int, int], transitions: int,
                     seconds: float) -> None:
        """One interval: who was live, how many each accepted, how many consecutive-accept pairs
        (transitions with a known predecessor) the kernel recorded on this port."""
        live_set = frozenset(live) | {p for p, c in accepts.items() if c > 0}
        total = sum(c for c in accepts.values() if c > 0)
        for pid, c in accepts.items():
            if c > 0:
                self.observed[pid] = self.observed.get(pid, 0) + c
        if live_set:
            if total:
                owed = total / len(live_set)
                for pid in live_set:
                    self.expected[pid] = self.expected.get(pid, 0.0) + owed
            n = len(live_set)
            self.live_min = n if self.live_min is None else min(self.live_min, n)
            self.live_max = n if self.live_max is None else max(self.live_max, n)
            self.live_time += n * seconds
            self.time += seconds
            if transitions > 0:
                self.epochs[live_set] = self.epochs.get(live_set, 0) + transitions
                if len(self.epochs) > MAX_EPOCHS:
                    smallest = min(self.epochs, key=lambda k: self.epochs[k])
                    m = self.epochs.pop(smallest)
                    self.folded_transitions += m
                    self.folded_q += m / len(smallest)

    def fold(self, pid: int) -> None:
        """An evicted worker: its figures join the single 'exited workers' entry."""
        if pid in self.expected:
            self.expected[EXITED] = self.expected.get(EXITED, 0.0) + self.expected.pop(pid)
        if pid in self.observed:
            self.observed[EXITED] = self.observed.get(EXITED, 0) + self.observed.pop(pid)

    def to_doc(self) -> dict[str, Any]:
        mean = self.live_time / self.time if self.time > 0 else None
        return {
            "expected": {str(p): round(e, 3) for p, e in sorted(self.expected.items())},
            "observed": {str(p): c for p, c in sorted(self.observed.items())},
            "live_workers": {"min": self.live_min, "max": self.live_max,
                             "mean": None if mean is None else round(mean, 2)},
            "epochs": [[sorted(k), m] for k, m in sorted(self.epochs.items(), key=lambda kv: sorted(kv[0]))],
            "folded": {"transitions": self.folded_transitions, "q_sum": round(self.folded_q, 6)},
        }


def self_baseline(observed: Mapping[int, int], expected: Mapping[int, float],
                  epochs: Iterable[tuple[Iterable[int], int]], folded_transitions: int = 0,
                  folded_q: float = 0.0) -> float | None:
    """Expected rate of 'same worker twice in a row' if each accept were an independent draw among the
    workers live at that moment, each weighted by its strength (observed / expected: 1.0 = fair)."""
    strength = {p: observed.get(p, 0) / e for p, e in expected.items() if e > 0}
    m_total = folded_transitions
    q_sum = folded_q
    for pids, m in epochs:
        live = list(pids)
        if not live or m <= 0:
            continue
        weights = [strength.get(p, 0.0) for p in live]
        s = sum(weights)
        q = sum((w / s) ** 2 for w in weights) if s > 0 else 1.0 / len(live)
        q_sum += m * q
        m_total += m
    return q_sum / m_total if m_total else None


class ShareTracker:
    """Turns cumulative per-(pid, port) kernel counters and transition counts into PortShares, one
    interval per update."""

    def __init__(self, start_ns: int | None = None) -> None:
        self.ports: dict[int, PortShares] = {}
        self._accepts: dict[tuple[int, int], int] = {}
        self._transitions: dict[tuple[int, int, int], int] = {}
        self._alive: frozenset[int] | None = None
        self._last_ns = start_ns

    def update(self, accepts: Mapping[tuple[int, int], int], transitions: Mapping[tuple[int, int, int], int],
               workers_by_port: Mapping[int, Iterable[int]], alive: Iterable[int], now_ns: int) -> None:
        """accepts: (pid, port) -> cumulative accepts; transitions: (port, prev, pid) -> cumulative
        count; workers_by_port: the workers holding each port's listener now; alive: pids alive now."""
        alive_now = frozenset(alive)
        seconds = 0.0 if self._last_ns is None else max(0.0, (now_ns - self._last_ns) / 1e9)
        deltas: dict[int, dict[int, int]] = {}
        for key, c in accepts.items():
            d = c - self._accepts.get(key, 0)
            if d > 0:
                deltas.setdefault(key[1], {})[key[0]] = d
        pairs: dict[int, int] = {}
        for key, c in transitions.items():
            d = c - self._transitions.get(key, 0)
            if d > 0 and key[1] != 0:
                pairs[key[0]] = pairs.get(key[0], 0) + d
        # Live for the whole interval: alive at its start and at its end.
        steady = alive_now if self._alive is None else alive_now & self._alive
        for port in set(workers_by_port) | set(deltas) | set(pairs):
            live = [p for p in workers_by_port.get(port, ()) if p in steady]
            self.ports.setdefault(port, PortShares()).add_interval(
                live, deltas.get(port, {}), pairs.get(port, 0), seconds)
        self._accepts = dict(accepts)
        self._transitions = dict(transitions)
        self._alive = alive_now
        self._last_ns = now_ns

    def fold(self, pid: int) -> None:
        for ps in self.ports.values():
            ps.fold(pid)

    def to_doc(self) -> dict[str, Any]:
        return {str(port): ps.to_doc() for port, ps in sorted(self.ports.items())}
