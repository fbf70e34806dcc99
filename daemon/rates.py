"""Accept rates per worker: accepts/s over sliding windows, and the per-second rate_history.

Fed with each update's per-pid increases of the (never decreasing) kernel counters. Bounded: the
window samples cover the longest window (capped at MAX_RATE_SAMPLES), the history HISTORY_S seconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

_NS = 1_000_000_000
RATE_WINDOWS_S = (1, 10, 60)
HISTORY_S = 300  # rate_history span
# One rate_history entry per ~second. Timers jitter, so a bin closes once 0.9 s have passed since it
# opened: with a 1 s update cadence every update closes exactly one bin.
BIN_CLOSE_S = 0.9
MAX_RATE_SAMPLES = 10_000  # safety cap on rate-window samples if updates come very fast


class RateTracker:
    def __init__(self, start_ns: int, rel_s: Callable[[int], float]) -> None:
        """start_ns: CLOCK_MONOTONIC ns when counting started; rel_s: ns -> seconds since the start."""
        self._start = start_ns
        self._rel_s = rel_s
        # (taken_ns, {pid: accepts since the previous sample}) for the rate windows
        self.samples: deque[tuple[int, dict[int, int]]] = deque(maxlen=MAX_RATE_SAMPLES)
        self._bin_start = start_ns
        self._bin: dict[int, int] = {}
        self._history: deque[list[Any]] = deque(maxlen=int(HISTORY_S / BIN_CLOSE_S) + 2)

    def add(self, now: int, deltas: dict[int, int]) -> None:
        """The accepts each pid made since the previous update, taken at `now`."""
        self.samples.append((now, deltas))
        horizon = now - (max(RATE_WINDOWS_S) + 1) * _NS
        while len(self.samples) > 1 and self.samples[1][0] < horizon:
            self.samples.popleft()
        for pid, d in deltas.items():
            self._bin[pid] = self._bin.get(pid, 0) + d
        if now - self._bin_start >= BIN_CLOSE_S * _NS:
            self.close_bin(now)

    def close_bin(self, now: int) -> None:
        t = round(self._rel_s(now), 3)
        self._history.append([t, {str(p): c for p, c in sorted(self._bin.items())}])
        self._bin = {}
        self._bin_start = now
        while self._history and self._history[0][0] <= t - HISTORY_S:
            self._history.popleft()

    def close_last(self, last_ns: int | None) -> None:
        """At the end: the final read rarely lands on a bin boundary; keep its accepts in the history."""
        if last_ns is not None and last_ns > self._bin_start:
            self.close_bin(last_ns)

    def rates(self, now: int | None) -> dict[int, dict[str, float]]:
        """accepts/s per pid over each window ending at the latest snapshot (taken at `now`)."""
        out: dict[int, dict[str, float]] = {}
        if now is None:
            return out
        times = [self._start] + [t for t, _ in self.samples if t < now]
        for win in RATE_WINDOWS_S:
            target = now - win * _NS
            # The sample nearest the window's start, so timer jitter does not stretch a 1 s window to 2 s.
            ref = min(times, key=lambda t: (abs(t - target), -t))
            dt = (now - ref) / _NS
            sums: dict[int, int] = {}
            for t, deltas in self.samples:
                if t > ref:
                    for pid, d in deltas.items():
                        sums[pid] = sums.get(pid, 0) + d
            for pid, s in sums.items():
                out.setdefault(pid, {})[f"{win}s"] = round(s / dt, 3) if dt > 0 else 0.0
        return out

    def history(self) -> list[list[Any]]:
        """rate_history: [seconds since start, {pid: accepts in that second}]."""
        return [[t, dict(c)] for t, c in self._history]
