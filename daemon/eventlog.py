"""NDJSON lines for a block of per-connection records, straight from the ring buffer's bytes.

The --events file gets one line per connection at the server's full accept rate, so the per-record
work is kept to one struct.iter_unpack step and one %-format: the wall-clock second, addresses and
process names repeat from record to record and are formatted once each (bounded caches); no
dataclass, dict or json.dumps per record. The lines are what event_to_dict() + json.dumps made before
(tests compare the two), minus the never-used `extra` field.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable

from accept_watch.probes.eventring import EVF_LISTENER_KNOWN, EVF_WAIT_KNOWN, RING_RECORD, STATIC, STRIDE
from accept_watch.probes.records import EventSource

from .clock import ClockMap, iso_utc

_NS = 1_000_000_000
CACHE_MAX = 65536  # distinct addresses / names kept formatted; cleared when full (bounded memory)
_SOURCES = {int(s): s.name.lower() for s in EventSource}
_FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}

# One line: ts, ts_ns, {pid .. local_port}, peer_addr, peer_port, queue_wait_ns, backlog,
# {backlog_limit .. source}. The braced parts are the same for every accept of a thread on one listener
# and are written into a per-(thread, listener) format; "%.0s" takes an argument and prints nothing
# (the "null" cases, so every record is formatted with the same arguments).
_HEAD = '{"ts":"%s.%06d+00:00","ts_ns":%d,'
_PEER = '"peer_addr":"%s","peer_port":%d,'


def _line_formats(head: str, tail: str) -> tuple[str, ...]:
    """Formats indexed by the record's flags (EVF_WAIT_KNOWN | EVF_LISTENER_KNOWN)."""
    head, tail = head.replace("%", "%%"), tail.replace("%", "%%")
    out = []
    for flags in range(4):
        wait = '"queue_wait_ns":%d,' if flags & EVF_WAIT_KNOWN else '"queue_wait_ns":null%.0s,'
        backlog = '"backlog":%d' if flags & EVF_LISTENER_KNOWN else '"backlog":null%.0s'
        out.append(_HEAD + head + _PEER + wait + backlog + tail + "}\n")
    return tuple(out)


class _Formatted(dict):  # type: ignore[type-arg]
    """raw bytes -> text, computed on first use; emptied when it reaches CACHE_MAX entries."""

    def __init__(self, fmt: Callable[[bytes], object]) -> None:
        super().__init__()
        self._fmt = fmt

    def __missing__(self, raw: bytes) -> object:
        if len(self) >= CACHE_MAX:
            self.clear()
        value = self[raw] = self._fmt(raw)
        return value


def _addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _second(wall_s: int) -> str:
    """'YYYY-MM-DDTHH:MM:SS' of a wall-clock second (iso_utc without the fraction)."""
    return iso_utc(wall_s * _NS)[:19]


def _static(raw: bytes, mark: str) -> tuple[tuple[str, ...], int, int]:
    """The fields that are the same for every accept of one thread on one listener, formatted into
    the line formats (_line_formats), with the family and local port."""
    ino, tgid, tid, limit, family, lport, source, known, laddr, comm = STATIC.unpack(raw)
    name = comm.split(b"\0", 1)[0].decode(errors="replace")
    fam = _FAMILIES.get(family, str(family))
    head = (f'"pid":{tgid},"tid":{tid},"comm":{json.dumps(name)},"family":"{fam}",'
            f'"local_addr":"{_addr(family, laddr)}","local_port":{lport},')
    inode = ino if known and ino else "null"
    tail = (f',"backlog_limit":{limit if known else "null"},"listener_inode":{inode}'
            f',"source":"{_SOURCES.get(source, str(source))}"{mark}')
    return _line_formats(head, tail), family, lport


class NdjsonEncoder:
    """Turns blocks of ring records (eventring.EventRing.drain) into NDJSON text."""

    def __init__(self, clock: ClockMap, ports: Iterable[int] | None = None, sample: int = 1) -> None:
        if sample < 1:
            raise ValueError(f"sample must be >= 1, got {sample}")
        self.offset_ns = clock.offset_ns
        self.ports = frozenset(ports) if ports else None
        self.sample = sample
        self._seen = 0  # records offered so far, for 1-in-N sampling
        self._v4 = _Formatted(lambda raw: _addr(socket.AF_INET, raw))
        self._v6 = _Formatted(lambda raw: _addr(socket.AF_INET6, raw))
        # Sampled lines say so (and by how much): the total stays exact in the export document.
        mark = f',"sampled_1_in":{sample}' if sample > 1 else ""
        self._static = _Formatted(lambda raw: _static(raw, mark))
        self._seconds = _Formatted(_second)

    def encode(self, block: bytes) -> tuple[str, int]:
        """(lines, how many) for the records in block (header + event each, STRIDE bytes)."""
        if not block:
            return "", 0
        if self.sample > 1:
            block = self._sampled(block)
        out: list[str] = []
        add = out.append
        off, v4, v6, statics, seconds = self.offset_ns, self._v4, self._v6, self._static, self._seconds
        ports, inet = self.ports, socket.AF_INET
        for _h, _p, ts, wait, backlog, rport, flags, raddr, static in RING_RECORD.iter_unpack(block):
            formats, family, lport = statics[static]
            if ports is not None and lport not in ports:
                continue
            wall = ts + off
            add(formats[flags & 3] % (seconds[wall // _NS], wall // 1000 % 1_000_000, ts,
                                      v4[raddr] if family == inet else v6[raddr], rport, wait, backlog))
        return "".join(out), len(out)

    def _sampled(self, block: bytes) -> bytes:
        """Every sample-th record offered since the start (the counting runs across blocks)."""
        n = len(block) // STRIDE
        first = (-self._seen) % self.sample
        self._seen += n
        view = memoryview(block)
        return b"".join(view[i * STRIDE:(i + 1) * STRIDE] for i in range(first, n, self.sample))


def records(block: bytes) -> Iterable[memoryview]:
    """The events (no ring header) of a block, as views."""
    view = memoryview(block)
    for start in range(0, len(block) - STRIDE + 1, STRIDE):
        yield view[start + 8:start + STRIDE]

