"""Kernel timestamps are CLOCK_MONOTONIC ns; the outputs show UTC wall time.

The wall-minus-monotonic offset is captured once, so a run's timeline stays consistent even if the
wall clock is stepped (NTP) while it runs.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable

_NS = 1_000_000_000
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


def iso_utc(wall_ns: int) -> str:
    """UTC ISO-8601 with microseconds, exact (no float rounding)."""
    seconds, rest = divmod(int(wall_ns), _NS)
    stamp = _EPOCH + _dt.timedelta(seconds=seconds, microseconds=rest // 1000)
    return stamp.isoformat(timespec="microseconds")


class ClockMap:
    """Maps CLOCK_MONOTONIC ns (kernel and time.monotonic_ns) to wall-clock ns."""

    def __init__(
        self,
        wall_clock: Callable[[], int] = time.time_ns,
        mono_clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.mono_clock = mono_clock
        self.wall_clock = wall_clock
        self.start_mono = mono_clock()
        self.start_wall = wall_clock()
        self.offset_ns = self.start_wall - self.start_mono

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns

    def iso(self, mono_ns: int) -> str:
        return iso_utc(self.wall_ns(mono_ns))

    def rel_s(self, mono_ns: int) -> float:
        """Seconds since this map was created."""
        return (mono_ns - self.start_mono) / _NS
