"""The per-connection record (struct accept_event) and a batch reader of the BPF ring buffer.

Why not BCC's open_ring_buffer(): libbpf calls back into Python through ctypes once per record, and
each call then copied, decoded and formatted one record: at ~35 k accepts/s that loop alone took
~60 % of a core. Here the ring buffer is mapped into this process (as libbpf does) and drained every
few tens of milliseconds as one block of fixed-size records, handed on as bytes; what to do with them
(NDJSON lines, the dashboard's recent events) is decided per block, not per record.

Ring buffer layout (kernel/bpf/ringbuf.c, stable ABI since 5.8): page 0 = consumer position (the
only page user space may write), page 1 = producer position, then the data area mapped twice in a
row so a record that wraps around is contiguous. Positions only grow; offset = position & (size-1).
Each record starts with an 8-byte header {u32 len | BUSY << 31 | DISCARD << 30, u32 page offset} and
takes len + 8 bytes rounded up to 8. A record is readable once its BUSY bit is clear.
Memory order: the producer publishes with store-release; x86-64 loads are not reordered with other
loads, so plain reads (producer position, then headers) see a consistent ring there. The BPF side
submits with BPF_RB_NO_WAKEUP: nothing is woken per record, the daemon drains on its own clock.
"""

from __future__ import annotations

import mmap
import socket
import struct

from .records import AcceptEvent, EventSource

# struct accept_event in accept_watch.c (natural alignment): what varies per connection (40 bytes),
# then what is the same for every accept of one thread on one listener (64 bytes, STATIC).
VARYING = struct.Struct("<QQIHBx16s")  # ts_ns, wait_ns, backlog, rport, flags, raddr
# ino, tgid, tid, backlog_limit, family, lport, source, listener_known, laddr, comm
STATIC = struct.Struct("<QIIIHHBBxxxxxx16s16s")
EVENT_FORMAT = struct.Struct("<" + VARYING.format.lstrip("<") + STATIC.format.lstrip("<"))
EVF_WAIT_KNOWN = 1
EVF_LISTENER_KNOWN = 2
HEADER = struct.Struct("<II")
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
RECORD_SIZE = EVENT_FORMAT.size
# One record in the ring: header + event, already a multiple of 8 (no padding between records).
STRIDE = HEADER.size + RECORD_SIZE
# A ring record as the encoder reads it: header, the varying fields, the static block as bytes.
RING_RECORD = struct.Struct(f"<II{VARYING.format.lstrip('<')}{STATIC.size}s")
assert RECORD_SIZE == 104 and STRIDE % 8 == 0 and RING_RECORD.size == STRIDE

# Where the local port sits in an event (no ring header): after the varying part, ino, tgid, tid,
# backlog_limit and family.
_LPORT = struct.Struct("<H")
LPORT_AT = VARYING.size + 8 + 4 + 4 + 4 + 2

_POS = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingError(Exception):
    """The ring buffer could not be mapped (one line)."""


def _addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def decode_event(data: bytes | memoryview) -> AcceptEvent:
    """One record (RECORD_SIZE bytes, no ring header) as a dataclass: for the few that need one."""
    (ts, wait, backlog, rport, flags, raddr, ino, tgid, tid, limit, family, lport, source, _known, laddr,
     comm) = EVENT_FORMAT.unpack_from(data)
    listener_known = bool(flags & EVF_LISTENER_KNOWN)
    return AcceptEvent(
        ts_ns=ts,
        pid=tgid,
        tid=tid,
        comm=comm.split(b"\0", 1)[0].decode(errors="replace"),
        family=family,
        local_addr=_addr(family, laddr),
        local_port=lport,
        peer_addr=_addr(family, raddr),
        peer_port=rport,
        queue_wait_ns=wait if flags & EVF_WAIT_KNOWN else None,
        backlog=backlog if listener_known else None,
        backlog_limit=limit if listener_known else None,
        listener_inode=ino if listener_known and ino else None,
        source=EventSource(source),
    )


def newest_events(block: bytes, n: int, ports: frozenset[int] | None = None) -> list[bytes]:
    """Up to n of the block's newest events (no ring header), oldest first; only those whose local
    port is in ports when given."""
    out: list[bytes] = []
    end = len(block) - len(block) % STRIDE
    while end >= STRIDE and len(out) < n:
        event = block[end - STRIDE + HEADER.size:end]
        end -= STRIDE
        if ports is None or _LPORT.unpack_from(event, LPORT_AT)[0] in ports:
            out.append(event)
    out.reverse()
    return out


def pack_event(ev: AcceptEvent) -> bytes:
    """The ring record (header + event) the BPF program would have written for ev."""
    known = ev.backlog is not None or ev.listener_inode is not None
    flags = (EVF_WAIT_KNOWN if ev.queue_wait_ns is not None else 0) | (EVF_LISTENER_KNOWN if known else 0)
    return HEADER.pack(RECORD_SIZE, 0) + EVENT_FORMAT.pack(
        ev.ts_ns, ev.queue_wait_ns or 0, ev.backlog or 0, ev.peer_port, flags,
        socket.inet_pton(ev.family, ev.peer_addr), ev.listener_inode or 0, ev.pid, ev.tid,
        ev.backlog_limit or 0, ev.family, ev.local_port, int(ev.source), int(known),
        socket.inet_pton(ev.family, ev.local_addr), ev.comm.encode()[:15],
    )


class EventRing:
    """A BPF_MAP_TYPE_RINGBUF map (fd, data size in bytes) mapped for batch reads."""

    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        if size <= 0 or size & (size - 1) or size % page:
            raise RingError(f"ring buffer size {size} is not a power-of-2 multiple of the page size")
        self.size = size
        self._mask = size - 1
        self._data_at = page  # the data area's offset in self._ro (after the producer page)
        try:
            self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._ro = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError as exc:
            raise RingError(f"cannot map the event ring buffer: {exc.strerror or exc}") from None
        self.skipped = 0  # records of another size or discarded (none are made by accept_watch.c)

    def drain(self) -> bytes:
        """Every committed record since the last call, as header+event records back to back
        (STRIDE bytes each, in order), and the space they took given back to the producer."""
        cons = _POS.unpack_from(self._cons, 0)[0]
        prod = _POS.unpack_from(self._ro, 0)[0]
        if prod == cons:
            return b""
        ro, start, avail = self._ro, self._data_at + (cons & self._mask), prod - cons
        if avail % STRIDE:
            return self._drain_slow(cons, cons, prod)
        # Fast path: the header words of all records at once (a strided view, read in C); the common
        # case is that every one is a committed record of our size.
        with memoryview(ro) as whole, whole[start:start + avail] as region, region.cast("I") as words:
            lengths = words[::STRIDE // 4].tolist()
        if lengths.count(RECORD_SIZE) == len(lengths):
            end = prod
        else:
            first = next(i for i, length in enumerate(lengths) if length != RECORD_SIZE)
            if not lengths[first] & BUSY_BIT:
                return self._drain_slow(cons, cons + first * STRIDE, prod)
            end = cons + first * STRIDE  # in order: nothing after a record still being written
        block = ro[start:start + (end - cons)]
        _POS.pack_into(self._cons, 0, end)
        return block

    def _drain_slow(self, cons: int, good_end: int, prod: int) -> bytes:
        """Records of another size or discarded among ours: keep ours, skip the rest."""
        ro, base, mask = self._ro, self._data_at, self._mask
        parts = [ro[base + (cons & mask):base + (cons & mask) + (good_end - cons)]]
        pos = good_end
        while pos < prod:
            length = _U32.unpack_from(ro, base + (pos & mask))[0]
            if length & BUSY_BIT:
                break
            body = length & ~(BUSY_BIT | DISCARD_BIT)
            if length == RECORD_SIZE:
                parts.append(ro[base + (pos & mask):base + (pos & mask) + STRIDE])
            else:
                self.skipped += 1
            pos += (body + HEADER.size + 7) & ~7
        _POS.pack_into(self._cons, 0, pos)
        return b"".join(parts)

    def close(self) -> None:
        for m in (self._cons, self._ro):
            m.close()
