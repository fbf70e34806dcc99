"""Fair shares over the workers able to accept at each moment.

A worker's fair share is not 1/n of the run's accepts: workers come and go (max-requests recycling,
reloads, a killed worker respawned), and one that lived for a tenth of the run is owed a tenth as
much. So at every read of the kernel counters (about once a second), the accepts of that interval
are owed evenly to the workers live during all of it (daemon/roles.py workers alive at its start and
at its end); summed, that is each worker's expected count. A worker born or gone during an interval
is owed exactly what it got there: when it was live within the interval is known only roughly, and a
guess would read as unfairness; it is judged on its steady intervals.

"The same worker twice in a row" is judged against independent draws among the workers live at the
same time as each acceptor: two workers are live together when their live spans overlap. Spans are
measured on the port's accept clock, not in seconds: the kernel numbers each accept on a port and
keeps, per worker, the numbers of its first and last accept, so a worker's place among everyone's
accepts is exact however bursty the load within one read, and an idle stretch weighs nothing (it holds
no pair of consecutive accepts to judge). A worker's live span is its accept span (first to last
accept on the port) widened by the read intervals it was live all through (alive at both ends,
holding the listener): so two generations
that follow each other within an interval are not mixed, however fast they turn over, and a worker
that accepts rarely (EPOLLEXCLUSIVE concentration: it waits all along but seldom wins) is not taken as
absent before its first and after its last accept. (Seen on `nginx -s reload` with --events: accept
spans alone shrank the rare winners' lives and raised the baseline by up to 0.03-0.08 over the one
from the workers' real membership.)

Everything is bounded: per-pid entries follow the aggregator's worker records (an evicted worker is
folded into one "exited" entry, pid 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

EXITED = 0  # pid key under which evicted workers' figures are folded


@dataclass(slots=True)
class PortShares:
    expected: dict[int, float] = field(default_factory=dict)
    observed: dict[int, int] = field(default_factory=dict)
    live_min: int | None = None
    live_max: int | None = None
    live_time: float = 0.0  # time-integral of the number of live workers (worker-seconds)
    time: float = 0.0

    def add_interval(self, steady: Iterable[int], partial: Mapping[int, tuple[int, int]],
                     accepts: Mapping[int, int], start_ns: int, end_ns: int) -> None:
        """One interval [start_ns, end_ns]: the workers live all through it, those born or gone
        during it (with the part of it they were seen live: first/last accept clipped to the
        interval), and how many each accepted."""
        full = set(steady)
        spans = {p: sp for p, sp in partial.items() if p not in full}
        got = {p: c for p, c in accepts.items() if c > 0}
        for pid, c in got.items():
            self.observed[pid] = self.observed.get(pid, 0) + c
            if pid not in full and pid not in spans:
                full.add(pid)
        total = sum(got.values())
        if total:
            # Born or gone meanwhile: owed what it got (see the module's docstring); the steady
            # workers share the rest evenly.
            rest = total - sum(got.get(p, 0) for p in spans)
            for pid in spans:
                self.expected[pid] = self.expected.get(pid, 0.0) + got.get(pid, 0)
            for pid in full:
                self.expected[pid] = self.expected.get(pid, 0.0) + (rest / len(full) if full else 0.0)
        if not full and not spans:
            return
        mean, peak, low = _overlap(len(full), spans.values(), start_ns, end_ns)
        seconds = max(0.0, (end_ns - start_ns) / 1e9)
        self.live_min = low if self.live_min is None else min(self.live_min, low)
        self.live_max = peak if self.live_max is None else max(self.live_max, peak)
        self.live_time += mean * seconds
        self.time += seconds

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
        }


def _overlap(steady: int, spans: Iterable[tuple[int, int]], start_ns: int,
             end_ns: int) -> tuple[float, int, int]:
    """Time-averaged, peak and lowest number of live workers over [start_ns, end_ns]: `steady` all
    along, plus one per span while it lasts. With no steady worker, over the spans' own extent only (a
    burst of load between two idle stretches is when anyone was seen live). The lowest is taken over
    stretches of non-zero length, so a generation handing over to the next inside one interval (a
    reload, a binary upgrade: old spans reach the interval's start, new ones its end) is not read as
    one live worker."""
    spans = list(spans)
    if not steady and spans:
        start_ns, end_ns = min(a for a, _ in spans), max(b for _, b in spans)
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], -e[1]))
    live = peak = steady
    low: int | None = None
    last, area = start_ns, 0.0
    for t, step in edges:
        if t > last:
            area += live * (t - last)
            low = live if low is None else min(low, live)
        last = max(last, t)
        live += step
        peak = max(peak, live)
    if end_ns > last or low is None:
        area += live * max(0, end_ns - last)
        low = live if low is None else min(low, live)
    span = end_ns - start_ns
    return (area / span if span > 0 else float(peak)), max(1, peak), max(1, low, steady)


def self_baseline(observed: Mapping[int, int], expected: Mapping[int, float],
                  spans: Mapping[int, tuple[float, float]], successors: Mapping[int, int]) -> float | None:
    """Expected rate of 'same worker twice in a row' if each accept were an independent draw among the
    workers live at that moment, each weighted by its strength (observed / expected: 1.0 = fair).

    spans: each worker's live span on one axis for all (the accept clock; seconds in old exports).
    Its accepts are taken as spread evenly over it. For acceptor i, the chance is the mean over its
    span of s_i / S(t), S(t) the summed strength of the workers live at t; averaged with weights
    successors[i] (its recorded successors). With every span overlapping throughout this is
    sum(p_i^2), the textbook figure.
    O(n log n) in the number of workers: one sweep, then a prefix integral of 1/S(t)."""
    strength = {p: (observed.get(p, 0) / e if e > 0 else 1.0) for p, e in expected.items()}
    live = {p: ab for p, ab in spans.items() if strength.get(p, 1.0) > 0}
    if not live:
        return None
    points = sorted({t for ab in live.values() for t in ab})
    # S on each piece [points[k], points[k+1]] (its midpoint) and at each point itself.
    changes: dict[float, float] = {}
    for p, (a, _b) in live.items():
        changes[a] = changes.get(a, 0.0) + strength.get(p, 1.0)
    at_point: list[float] = []
    on_piece: list[float] = []
    current = 0.0
    ending: dict[float, float] = {}
    for p, (_a, b) in live.items():
        ending[b] = ending.get(b, 0.0) + strength.get(p, 1.0)
    for t in points:
        current += changes.get(t, 0.0)
        at_point.append(current)  # spans are closed: live at both ends
        current -= ending.get(t, 0.0)
        on_piece.append(current)
    integral = [0.0]  # prefix integral of 1/S over the pieces
    for k in range(len(points) - 1):
        width = points[k + 1] - points[k]
        integral.append(integral[-1] + (width / on_piece[k] if on_piece[k] > 0 else 0.0))
    index = {t: k for k, t in enumerate(points)}
    total_m = 0
    q_sum = 0.0
    for pid, m in successors.items():
        if m <= 0 or pid not in live:
            continue
        a, b = live[pid]
        ka, kb = index[a], index[b]
        inverse = (integral[kb] - integral[ka]) / (b - a) if b > a else 1.0 / at_point[ka]
        q_sum += m * min(1.0, strength.get(pid, 1.0) * inverse)
        total_m += m
    return q_sum / total_m if total_m else None


class ShareTracker:
    """Turns cumulative per-(pid, port) kernel counters into PortShares, one interval per update."""

    def __init__(self, start_ns: int | None = None, alive: Iterable[int] | None = None) -> None:
        """start_ns, alive: when counting starts and who is alive then (else: the first update)."""
        self.ports: dict[int, PortShares] = {}
        self.spans: dict[int, dict[int, tuple[int, int]]] = {}  # port -> pid -> (first, last) accept ns
        # port -> pid -> (from, until) ns of the intervals it was live all through
        self.steady: dict[int, dict[int, tuple[int, int]]] = {}
        # The same two, on the port's accept clock (see AcceptClock): what the baseline integrates over.
        self.accept_spans: dict[int, dict[int, tuple[float, float]]] = {}
        self.accept_steady: dict[int, dict[int, tuple[float, float]]] = {}
        self._port_total: dict[int, int] = {}
        self._accepts: dict[tuple[int, int], int] = {}
        self._alive: frozenset[int] | None = frozenset(alive) if alive is not None else None
        self._last_ns = start_ns

    def update(self, accepts: Mapping[tuple[int, int], int], workers_by_port: Mapping[int, Iterable[int]],
               alive: Iterable[int], now_ns: int,
               spans: Mapping[tuple[int, int], tuple[int, int]] | None = None,
               born: Mapping[int, int] | None = None,
               seq_spans: Mapping[tuple[int, int], tuple[int, int]] | None = None) -> None:
        """accepts: (pid, port) -> cumulative accepts; workers_by_port: the workers holding each port's
        listener now; alive: pids alive now; spans: (pid, port) -> (first, last) accept time; born:
        pid -> when the process started, where known (all CLOCK_MONOTONIC ns); seq_spans: (pid, port)
        -> the port's accept sequence numbers at its first and last accept (the kernel's; 0: unknown).
        Given, the accept clock is the kernel's sequence; else (a source without it) the interval's
        accepts are placed evenly over its time."""
        alive_now = frozenset(alive)
        start_ns = self._last_ns if self._last_ns is not None else now_ns
        spans = spans or {}
        deltas: dict[int, dict[int, int]] = {}
        for key, c in accepts.items():
            d = c - self._accepts.get(key, 0)
            if d > 0:
                deltas.setdefault(key[1], {})[key[0]] = d
        before = alive_now if self._alive is None else self._alive
        for port in set(workers_by_port) | set(deltas):
            accepted = deltas.get(port, {})
            # Live all through the interval: alive at its start and at its end.
            steady = [p for p in workers_by_port.get(port, ()) if p in alive_now and p in before]
            partial = {}
            for pid in accepted:
                if pid in steady:
                    continue
                first, last = spans.get((pid, port), (start_ns, now_ns))
                lo = start_ns if pid in before else min(max(first, start_ns), now_ns)
                if pid not in before and born and start_ns <= born.get(pid, -1) <= lo:
                    # Forked during the interval: live from its start, not only from its first
                    # accept (a new generation waits idle while the old one still wins: a binary
                    # upgrade or reload handing over within one interval is not a dip in live workers).
                    lo = born[pid]
                hi = now_ns if pid in alive_now else max(min(last, now_ns), lo)
                partial[pid] = (lo, hi)
            shares = self.ports.setdefault(port, PortShares())
            shares.add_interval(steady, partial, accepted, start_ns, now_ns)
            extent = self.steady.setdefault(port, {})
            for pid in steady:
                lo, hi = extent.get(pid, (start_ns, now_ns))
                extent[pid] = (min(lo, start_ns), max(hi, now_ns))
            prev_end = self._port_total.get(port, 0)
            if seq_spans is not None:
                ends = [seq_spans.get((pid, port), (0, 0))[1] for pid in accepted]
                end = max([prev_end, *ends])
            else:
                end = prev_end + sum(accepted.values())
            clock = AcceptClock(start_ns, now_ns, prev_end, end - prev_end)
            self._port_total[port] = clock.end
            on_clock = self.accept_steady.setdefault(port, {})
            for pid in steady:
                lo_c, hi_c = on_clock.get(pid, (clock.start, clock.end))
                on_clock[pid] = (min(lo_c, clock.start), max(hi_c, clock.end))
            known = self.spans.get(port, {})
            mapped = self.accept_spans.setdefault(port, {})
            for pid in accepted:
                first_seq, last_seq = (seq_spans or {}).get((pid, port), (0, 0))
                if first_seq and last_seq:
                    # Sequence k is the k-th accept: it occupies [k - 1, k] on the clock.
                    mapped[pid] = (float(first_seq - 1), float(max(first_seq, last_seq)))
                    continue
                first, last = spans.get((pid, port), (now_ns, now_ns))
                before_c = mapped.get(pid)
                # Only an end that moved during this interval lies in it; an unchanged one keeps the
                # position it was given when it did.
                first_c = before_c[0] if before_c else clock.at(first)
                last_c = before_c[1] if before_c and known.get(pid, (0, -1))[1] == last else clock.at(last)
                mapped[pid] = (first_c, max(first_c, last_c))
        for (pid, port), span in spans.items():
            self.spans.setdefault(port, {})[pid] = span
        self._accepts = dict(accepts)
        self._alive = alive_now
        self._last_ns = now_ns

    def fold(self, pid: int) -> None:
        for ps in self.ports.values():
            ps.fold(pid)
        for spans in (*self.spans.values(), *self.steady.values(), *self.accept_spans.values(),
                      *self.accept_steady.values()):
            spans.pop(pid, None)

    def live_spans(self, port: int) -> dict[int, tuple[int, int]]:
        """pid -> (from, until) ns: each accepting worker's accept span widened by its steady intervals."""
        extent = self.steady.get(port, {})
        out = {}
        for pid, (a, b) in self.spans.get(port, {}).items():
            lo, hi = extent.get(pid, (a, b))
            out[pid] = (min(a, lo), max(b, hi))
        return out

    def live_accept_spans(self, port: int) -> dict[int, tuple[float, float]]:
        """live_spans() on the port's accept clock."""
        extent = self.accept_steady.get(port, {})
        out = {}
        for pid, (a, b) in self.accept_spans.get(port, {}).items():
            lo, hi = extent.get(pid, (a, b))
            out[pid] = (min(a, lo), max(b, hi))
        return out

    def to_doc(self, rel_s: Callable[[int], float]) -> dict[str, Any]:
        """rel_s: CLOCK_MONOTONIC ns -> seconds since the run started (the document's time base)."""
        out = {}
        for port, ps in sorted(self.ports.items()):
            d = ps.to_doc()
            d["spans"] = {str(p): [round(rel_s(a), 3), round(rel_s(b), 3)]
                          for p, (a, b) in sorted(self.live_spans(port).items())}
            d["accept_spans"] = {str(p): [round(float(a), 2), round(float(b), 2)]
                                 for p, (a, b) in sorted(self.live_accept_spans(port).items())}
            out[str(port)] = d
        return out


@dataclass(frozen=True, slots=True)
class AcceptClock:
    """One read interval on a port's accept clock: the clock reads how many accepts the port had made
    (a fraction within the interval, whose accepts are taken as spread evenly over its time).

    The same-worker baseline integrates over this clock, not over seconds: an idle stretch (a load
    pause while a killed worker is respawned, a quiet night) then weighs nothing, as it holds no
    consecutive accepts to judge; over seconds it weighed as much as a busy stretch, with whoever was
    live during it (seen: uvicorn, a worker SIGKILLed between two bursts, baseline 0.39 against 0.32
    from the log)."""

    start_ns: int
    end_ns: int
    start: int  # port accepts before the interval
    count: int  # port accepts during it

    @property
    def end(self) -> int:
        return self.start + self.count

    def at(self, t_ns: int) -> float:
        if self.end_ns <= self.start_ns:
            return float(self.end)
        f = min(1.0, max(0.0, (t_ns - self.start_ns) / (self.end_ns - self.start_ns)))
        return self.start + self.count * f
