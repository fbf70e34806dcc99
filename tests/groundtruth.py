"""What a server's own log says about how its connections were spread: pure functions over per-connection
records, so that a verdict can be judged against the log rather than against a hard-coded expectation.

A record is one connection as the server logged it: the pid that accepted (or served) it, a time on the
server's own clock, the local (listening) port, and for servers that fork a child per connection, the
child's pid. Records are taken in log order (the order the server handled them).

"Alive" is which workers could have taken a connection at a given moment: by default a worker is alive
from its first to its last record (a lower bound on its real life; lifecycle events, when known, can
widen it), so that workers replaced during a run are not counted as idle where they did not exist.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One connection from a server's own log."""

    pid: int  # the process that accepted it (ForkingTCPServer: the parent)
    t: float  # seconds, on the server's clock (only compared within one server's log)
    port: int  # the local (listening) port
    child: int | None = None  # the per-connection child that served it, for forking servers


Lifetimes = Mapping[int, tuple[float, float]]  # pid -> (alive from, alive until), inclusive


def per_pid(records: Sequence[LogRecord]) -> dict[int, int]:
    return dict(sorted(Counter(r.pid for r in records).items()))


def per_port(records: Sequence[LogRecord]) -> dict[int, int]:
    return dict(sorted(Counter(r.port for r in records).items()))


def shares(records: Sequence[LogRecord]) -> dict[int, float]:
    """Each pid's share of all records."""
    n = len(records)
    return {pid: c / n for pid, c in per_pid(records).items()} if n else {}


def on_port(records: Sequence[LogRecord], port: int) -> list[LogRecord]:
    return [r for r in records if r.port == port]


def self_rate(records: Sequence[LogRecord]) -> float | None:
    """Fraction of consecutive pairs (in log order) taken by the same pid; None below two records."""
    if len(records) < 2:
        return None
    same = sum(1 for a, b in itertools.pairwise(records) if a.pid == b.pid)
    return same / (len(records) - 1)


def lifetimes(records: Sequence[LogRecord], known: Lifetimes | None = None) -> dict[int, tuple[float, float]]:
    """pid -> (first record, last record), widened by `known` (e.g. boot and exit times from lifecycle
    events). A pid only in `known` is included: a worker that was alive and took nothing."""
    life: dict[int, tuple[float, float]] = {}
    for r in records:
        lo, hi = life.get(r.pid, (r.t, r.t))
        life[r.pid] = (min(lo, r.t), max(hi, r.t))
    for pid, (lo, hi) in (known or {}).items():
        if hi < lo:
            raise ValueError(f"pid {pid}: alive until {hi} before alive from {lo}")
        if pid in life:
            life[pid] = (min(lo, life[pid][0]), max(hi, life[pid][1]))
        else:
            life[pid] = (lo, hi)
    return life


def always(pids: Sequence[int]) -> dict[int, tuple[float, float]]:
    """Lifetimes for workers known to be alive over the whole log (steady state), including any that
    took nothing."""
    return {pid: (-math.inf, math.inf) for pid in pids}


def from_membership(initial: Sequence[int], final: Sequence[int]) -> dict[int, tuple[float, float]]:
    """Lifetimes known from who was there at the start and at the end of the log: a worker present at
    the start was alive from the beginning, one present at the end until the end. Merged with the records
    by lifetimes(): the others live from their first to their last record."""
    out: dict[int, tuple[float, float]] = {}
    for pid in set(initial) | set(final):
        lo = -math.inf if pid in initial else math.inf  # inf: "from its first record" once merged
        hi = math.inf if pid in final else -math.inf  # -inf: "until its last record" once merged
        out[pid] = (lo, hi)  # never (inf, -inf): the pid is in one of the two
    return out


def alive_at(life: Lifetimes, t: float) -> frozenset[int]:
    return frozenset(pid for pid, (lo, hi) in life.items() if lo <= t <= hi)


def live_counts(records: Sequence[LogRecord], life: Lifetimes) -> list[int]:
    """How many workers were alive at each record (accept-weighted)."""
    return [len(alive_at(life, r.t)) for r in records]


def live_summary(records: Sequence[LogRecord], life: Lifetimes) -> dict[str, float]:
    """{"min", "max", "mean"} of the number of live workers over the records."""
    counts = live_counts(records, life)
    if not counts:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": min(counts), "max": max(counts), "mean": sum(counts) / len(counts)}


def fair_expected(records: Sequence[LogRecord], life: Lifetimes) -> dict[int, float]:
    """Each worker's expected count if every connection went to one of the workers alive at that moment
    with equal chance: the sum over its lifetime of 1/(live workers)."""
    expected: dict[int, float] = dict.fromkeys(life, 0.0)
    for r in records:
        live = alive_at(life, r.t)
        for pid in live:
            expected[pid] += 1.0 / len(live)
    return expected


def live_fair_ratios(records: Sequence[LogRecord], life: Lifetimes) -> dict[int, float]:
    """Observed / expected count per worker, expected among the workers alive at each connection. Near 1
    for every worker means an even spread, however many were replaced."""
    counts = per_pid(records)
    return {pid: counts.get(pid, 0) / e for pid, e in fair_expected(records, life).items() if e > 0}


def live_share_rates(records: Sequence[LogRecord], life: Lifetimes) -> dict[int, float]:
    """Each worker's share of the connections that arrived while it was alive."""
    out: dict[int, float] = {}
    counts = per_pid(records)
    for pid, (lo, hi) in life.items():
        during = sum(1 for r in records if lo <= r.t <= hi)
        if during:
            out[pid] = counts.get(pid, 0) / during
    return out


def _pair_probabilities(records: Sequence[LogRecord], life: Lifetimes, weighted: bool) -> list[float]:
    """For each consecutive pair, the chance that both went to the same worker if each connection chose
    independently among the workers alive at its moment: with equal chances, or (weighted) with chances
    proportional to each worker's own share while it was alive."""
    rate = live_share_rates(records, life) if weighted else {}
    probs: list[float] = []
    prev_dist: dict[int, float] | None = None
    for r in records:
        live = alive_at(life, r.t)
        weights = {pid: (rate.get(pid, 0.0) if weighted else 1.0) for pid in live}
        total = sum(weights.values())
        dist = {pid: w / total for pid, w in weights.items()} if total > 0 else {}
        if prev_dist is not None:
            probs.append(sum(p * dist.get(pid, 0.0) for pid, p in prev_dist.items()))
        prev_dist = dist
    return probs


def expected_self_rate(records: Sequence[LogRecord], life: Lifetimes, weighted: bool = False) -> float | None:
    """The same-worker-twice-in-a-row rate expected if connections were independent, given which workers
    were alive at each one (equal chances among them, or weighted by their observed live shares)."""
    probs = _pair_probabilities(records, life, weighted)
    return sum(probs) / len(probs) if probs else None


def self_rate_noise(records: Sequence[LogRecord], life: Lifetimes, weighted: bool = False) -> float:
    """One standard deviation of the independent same-worker rate (pairs treated as independent trials:
    a slight underestimate, so callers use several of them)."""
    probs = _pair_probabilities(records, life, weighted)
    if not probs:
        return math.inf
    return math.sqrt(sum(p * (1 - p) for p in probs)) / len(probs)


def top_share(records: Sequence[LogRecord]) -> float:
    s = shares(records)
    return max(s.values()) if s else 0.0


@dataclass(frozen=True, slots=True)
class Spread:
    """What the log shows, in the terms a verdict uses."""

    n: int
    workers: int  # distinct pids with records or known lifetimes
    top_share: float
    max_fair_ratio: float  # busiest worker's observed/expected, among the live workers
    min_fair_ratio: float
    self_rate: float | None
    self_expected: float | None  # equal chances among the live workers
    self_noise: float
    live: dict[str, float]

    @property
    def single_acceptor(self) -> bool:
        return self.n > 0 and self.top_share >= 0.99

    def even(self, tolerance: float = 0.35) -> bool:
        """Every worker within `tolerance` of its fair share among the workers alive at the time (one
        worker alone is not a spread at all: False)."""
        within = self.max_fair_ratio <= 1 + tolerance and self.min_fair_ratio >= 1 - tolerance
        return self.workers > 1 and within

    def streaky(self, sigmas: float = 4.0) -> bool:
        """The same worker takes consecutive connections more often than independence among the live
        workers allows: a run-length concentration the shares alone do not show."""
        if self.self_rate is None or self.self_expected is None:
            return False
        return self.self_rate > self.self_expected + sigmas * self.self_noise + 0.02

    def independent_like(self, sigmas: float = 4.0) -> bool:
        """The same-worker rate is within noise of its live-aware independent expectation."""
        if self.self_rate is None or self.self_expected is None:
            return False
        return abs(self.self_rate - self.self_expected) <= sigmas * self.self_noise + 0.02


def spread(
    records: Sequence[LogRecord], known: Lifetimes | None = None, min_expected: float = 10.0
) -> Spread:
    """The log's spread. Fair ratios leave out workers expected fewer than `min_expected` connections
    (a worker seen for an instant has a ratio that is all noise)."""
    life = lifetimes(records, known)
    expected = fair_expected(records, life)
    ratios = {pid: r for pid, r in live_fair_ratios(records, life).items() if expected[pid] >= min_expected}
    return Spread(
        n=len(records),
        workers=len(life),
        top_share=top_share(records),
        max_fair_ratio=max(ratios.values(), default=0.0),
        min_fair_ratio=min(ratios.values(), default=0.0),
        self_rate=self_rate(records),
        self_expected=expected_self_rate(records, life),
        self_noise=self_rate_noise(records, life),
        live=live_summary(records, life),
    )
