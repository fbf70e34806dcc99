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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_EPOCHS = 256
EXITED = 0  # pid key under which evicted workers' figures are folded


Presence = tuple[tuple[int, float], ...]  # sorted (pid, fraction of the interval it was live)


def _presence_key(presence: Mapping[int, float]) -> Presence:
    return tuple(sorted((p, round(f, 2)) for p, f in presence.items()))


@dataclass(slots=True)
class PortShares:
    expected: dict[int, float] = field(default_factory=dict)
    observed: dict[int, int] = field(default_factory=dict)
    # who was live (and for what fraction of the interval) -> consecutive-accept pairs seen meanwhile
    epochs: dict[Presence, int] = field(default_factory=dict)
    folded_transitions: int = 0
    folded_q: float = 0.0  # sum of transitions / live workers of folded epochs (even-split baseline)
    live_min: int | None = None
    live_max: int | None = None
    live_time: float = 0.0  # sum of live workers * interval seconds
    time: float = 0.0

    def add_interval(self, presence: Mapping[int, float], accepts: Mapping[int, int], transitions: int,
                     seconds: float) -> None:
        """One interval: who was live and for what fraction of it (1.0: the whole interval), how many
        each accepted, how many consecutive-accept pairs (transitions with a known predecessor)."""
        present = {p: min(1.0, max(0.05, f)) for p, f in presence.items()}
        for pid, c in accepts.items():
            if c > 0:
                self.observed[pid] = self.observed.get(pid, 0) + c
                present.setdefault(pid, 1.0)
        if not present:
            return
        weight = sum(present.values())
        total = sum(c for c in accepts.values() if c > 0)
        if total:
            for pid, f in present.items():
                self.expected[pid] = self.expected.get(pid, 0.0) + total * f / weight
        n = max(1, round(weight))
        self.live_min = n if self.live_min is None else min(self.live_min, n)
        self.live_max = n if self.live_max is None else max(self.live_max, n)
        self.live_time += n * seconds
        self.time += seconds
        if transitions > 0:
            key = _presence_key(present)
            self.epochs[key] = self.epochs.get(key, 0) + transitions
            if len(self.epochs) > MAX_EPOCHS:
                smallest = min(self.epochs, key=lambda k: self.epochs[k])
                m = self.epochs.pop(smallest)
                self.folded_transitions += m
                self.folded_q += m / max(1.0, sum(f for _, f in smallest))

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
            "epochs": [[[p for p, _ in k], m, [f for _, f in k]] for k, m in sorted(self.epochs.items())],
            "folded": {"transitions": self.folded_transitions, "q_sum": round(self.folded_q, 6)},
        }


def self_baseline(observed: Mapping[int, int], expected: Mapping[int, float],
                  epochs: Iterable[tuple[Sequence[int], int, Sequence[float] | None]],
                  folded_transitions: int = 0, folded_q: float = 0.0) -> float | None:
    """Expected rate of 'same worker twice in a row' if each accept were an independent draw among the
    workers live at that moment, each weighted by its strength (observed / expected: 1.0 = fair).

    Per epoch, with N the time-averaged number of live workers (sum of presence fractions) and C the
    strengths' concentration (presence-weighted mean of s^2 over the squared mean of s), q = C / N:
    1/n for n even workers live the whole time, sum(p_i^2) for uneven ones; two generations that
    follow each other within one interval count as the N live at a time, not as all of them."""
    strength = {p: observed.get(p, 0) / e for p, e in expected.items() if e > 0}
    m_total = folded_transitions
    q_sum = folded_q
    for pids, m, weights in epochs:
        live = list(pids)
        if not live or m <= 0:
            continue
        f = list(weights) if weights is not None else [1.0] * len(live)
        n = sum(f)
        s = [strength.get(p, 0.0) for p in live]
        mean_s = sum(fi * si for fi, si in zip(f, s, strict=True)) / n
        mean_s2 = sum(fi * si * si for fi, si in zip(f, s, strict=True)) / n
        conc = mean_s2 / (mean_s * mean_s) if mean_s > 0 else 1.0
        q_sum += m * min(1.0, conc / max(1.0, n))
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
               workers_by_port: Mapping[int, Iterable[int]], alive: Iterable[int], now_ns: int,
               spans: Mapping[int, tuple[int, int]] | None = None) -> None:
        """accepts: (pid, port) -> cumulative accepts; transitions: (port, prev, pid) -> cumulative
        count; workers_by_port: the workers holding each port's listener now; alive: pids alive now;
        spans: pid -> (first, last) accept time (CLOCK_MONOTONIC ns), which bound when a worker born
        or gone during the interval was live."""
        alive_now = frozenset(alive)
        start_ns = self._last_ns if self._last_ns is not None else now_ns
        seconds = max(0.0, (now_ns - start_ns) / 1e9)
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
        before = alive_now if self._alive is None else self._alive
        for port in set(workers_by_port) | set(deltas) | set(pairs):
            accepted = deltas.get(port, {})
            # Live the whole interval: alive at its start and at its end.
            presence = {p: 1.0 for p in workers_by_port.get(port, ()) if p in alive_now and p in before}
            for pid in accepted:
                if pid not in presence:
                    presence[pid] = self._fraction(pid, pid in before, pid in alive_now, start_ns, now_ns,
                                                   spans)
            self.ports.setdefault(port, PortShares()).add_interval(presence, accepted, pairs.get(port, 0),
                                                                   seconds)
        self._accepts = dict(accepts)
        self._transitions = dict(transitions)
        self._alive = alive_now
        self._last_ns = now_ns

    @staticmethod
    def _fraction(pid: int, at_start: bool, at_end: bool, start_ns: int, end_ns: int,
                  spans: Mapping[int, tuple[int, int]] | None) -> float:
        """Part of the interval a worker that accepted in it was live: from its first accept if it was
        born meanwhile, to its last accept if it has gone (a recycled worker exits right after its
        last request)."""
        if end_ns <= start_ns or spans is None or pid not in spans:
            return 1.0
        first, last = spans[pid]
        lo = start_ns if at_start else max(start_ns, min(first, end_ns))
        hi = end_ns if at_end else min(end_ns, max(last, start_ns))
        return max(0.0, hi - lo) / (end_ns - start_ns)

    def fold(self, pid: int) -> None:
        for ps in self.ports.values():
            ps.fold(pid)

    def to_doc(self) -> dict[str, Any]:
        return {str(port): ps.to_doc() for port, ps in sorted(self.ports.items())}
