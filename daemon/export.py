"""JSON export (atomic rewrites of the snapshot document) and the NDJSON per-connection event log."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from accept_watch.probes.eventring import pack_event
from accept_watch.probes.records import AcceptEvent

from .clock import ClockMap
from .eventlog import NdjsonEncoder

_FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


class ExportError(Exception):
    """One-line reason why an output file cannot be written."""


def _reason(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else str(exc)


def check_writable(path: str | os.PathLike[str], what: str = "export") -> None:
    """Refuse an output path up front (before any probe is attached), by actually creating a file
    next to it: permission bits alone say nothing about read-only mounts or /proc."""
    p = Path(path)
    prefix = f"cannot write {what} to {p}"
    if p.is_dir():
        raise ExportError(f"{prefix}: it is a directory")
    parent = p.parent
    if not parent.exists():
        # An ancestor that is a regular file also makes the parent "not exist": say which.
        blocker = next((a for a in parent.parents if a.exists() and not a.is_dir()), None)
        if blocker is not None:
            raise ExportError(f"{prefix}: {blocker} is not a directory")
        raise ExportError(f"{prefix}: directory does not exist")
    if not parent.is_dir():
        raise ExportError(f"{prefix}: {parent} is not a directory")
    if p.exists() and not os.access(p, os.W_OK):
        raise ExportError(f"{prefix}: permission denied")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".check")
    except OSError as exc:
        raise ExportError(f"{prefix}: {_reason(exc)}") from None
    os.close(fd)
    os.unlink(probe)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Readers (a dashboard, a CI job) never see a half-written file: temp file in the same
    directory, fsync, rename. Raises OSError; callers turn it into their one-line error."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; exports and reports are meant to be shared
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    try:
        write_text_atomic(path, json.dumps(doc, indent=1) + "\n")
    except OSError as exc:
        raise ExportError(f"cannot write export to {Path(path)}: {_reason(exc)}") from None


def event_to_dict(ev: AcceptEvent, clock: ClockMap) -> dict[str, Any]:
    """The dataclass fields, with readable family/source and the wall-clock time added."""
    d: dict[str, Any] = {"ts": clock.iso(ev.ts_ns)}
    for f in dataclasses.fields(ev):
        d[f.name] = getattr(ev, f.name)
    d["family"] = _FAMILIES.get(ev.family, str(ev.family))
    d["source"] = ev.source.name.lower()
    return d


def open_events_file(path: Path) -> IO[str]:
    """The one place the --events file is opened (appended to)."""
    return open(path, "a", encoding="utf-8")


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
