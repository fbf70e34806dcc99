"""JSON export (atomic rewrites of the snapshot document) and the NDJSON per-connection event log."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from accept_watch.probes.eventring import pack_event
from accept_watch.probes.records import AcceptEvent

from . import safefile
from .clock import ClockMap
from .eventlog import NdjsonEncoder
from .safefile import ExportError
from .safefile import reason as _reason

_FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


def check_writable(path: str | os.PathLike[str], what: str = "export") -> None:
    """Refuse an output path up front (before any probe is attached): see daemon/safefile.py."""
    safefile.check_output(path, what)


def write_text_atomic(path: str | os.PathLike[str], text: str, what: str = "export") -> None:
    """Temp file, fsync, rename, with the target re-checked at write time. Raises ExportError."""
    safefile.write_atomic(path, text, what)


def write_json_atomic(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")


def event_to_dict(ev: AcceptEvent, clock: ClockMap) -> dict[str, Any]:
    """The dataclass fields, with readable family/source and the wall-clock time added."""
    d: dict[str, Any] = {"ts": clock.iso(ev.ts_ns)}
    for f in dataclasses.fields(ev):
        d[f.name] = getattr(ev, f.name)
    d["family"] = _FAMILIES.get(ev.family, str(ev.family))
    d["source"] = ev.source.name.lower()
    return d


def open_events_file(path: Path) -> IO[str]:
    """The one place the --events file is opened (appended to): through daemon/safefile.py."""
    return os.fdopen(safefile.open_events_file(path), "a", encoding="utf-8")


class EventWriter:
    """Appends one JSON line per accepted connection, a block of ring-buffer records at a time
    (daemon/eventlog.py formats them). Flushed at most every flush_every_s seconds (and on close),
    so a busy server costs buffered writes, not one syscall per connection. ports: only records of
    these local ports (--port); sample: one line per `sample` records (--events-sample)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        clock: ClockMap | None = None,
        flush_every_s: float = 1.0,
        ports: Iterable[int] | None = None,
        sample: int = 1,
    ) -> None:
        self.path = Path(path)
        self.clock = clock if clock is not None else ClockMap()
        self.encoder = NdjsonEncoder(self.clock, ports=ports, sample=sample)
        self.flush_every_s = flush_every_s
        self.written = 0
        self._last_flush = time.monotonic()
        try:
            # Opened through safefile: no symlink, no FIFO/device, new files 0600.
            self._f: IO[str] | None = open_events_file(self.path)
        except OSError as exc:
            raise ExportError(f"cannot write events to {self.path}: {_reason(exc)}") from None

    def write(self, ev: AcceptEvent) -> None:
        """One event (tests, tools): the same encoding as the kernel's records."""
        self.write_block(pack_event(ev))

    def write_block(self, block: bytes) -> None:
        """Records as drained from the ring buffer (probes/eventring.py)."""
        if self._f is None:
            raise ExportError(f"event log {self.path} is closed")
        text, n = self.encoder.encode(block)
        if not n:
            return
        try:
            self._f.write(text)
        except OSError as exc:
            raise ExportError(f"cannot write events to {self.path}: {_reason(exc)}") from None
        self.written += n
        now = time.monotonic()
        if now - self._last_flush >= self.flush_every_s:
            self.flush()
            self._last_flush = now
    def flush(self) -> None:
        if self._f is None:
            return
        try:
            self._f.flush()
        except OSError as exc:
            raise ExportError(f"cannot write events to {self.path}: {_reason(exc)}") from None

    def close(self) -> None:
        if self._f is None:
            return
        f, self._f = self._f, None
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            raise ExportError(f"cannot write events to {self.path}: {_reason(exc)}") from None
        finally:
            with contextlib.suppress(OSError):  # already reported above if the data did not make it
                f.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
