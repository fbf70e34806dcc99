"""eventring.EventRing's reading of the ring buffer layout, on a memfd laid out as the kernel's map
(consumer page, producer page, data area twice in a row): committed records in order, a busy record
stops the block, discarded and foreign records are skipped, positions wrap around. The real map is
read in tests/test_kernel_probes.py."""

from __future__ import annotations

import mmap
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from accept_watch.probes.eventring import (
    BUSY_BIT,
    DISCARD_BIT,
    HEADER,
    RECORD_SIZE,
    STRIDE,
    EventRing,
    RingError,
    decode_event,
    pack_event,
)
from accept_watch.probes.records import AcceptEvent, EventSource

PAGE = mmap.PAGESIZE
SIZE = PAGE  # one data page: 39 records


class FakeRing:
    def __init__(self) -> None:
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * SIZE)
        self.map = mmap.mmap(self.fd, 2 * PAGE + 2 * SIZE)
        self.prod = 0
        self.data = bytearray(SIZE)

    def put(self, record: bytes, length: int | None = None) -> None:
        """Write a record (header included) at the producer position, in both copies of the data."""
        if length is not None:
            record = HEADER.pack(length, 0) + record[HEADER.size:]
        for j, byte in enumerate(record):
            self.data[(self.prod + j) % SIZE] = byte
        # the data area is mapped twice in a row (a record that wraps reads as contiguous)
        self.map[2 * PAGE:2 * PAGE + SIZE] = bytes(self.data)
        self.map[2 * PAGE + SIZE:2 * PAGE + 2 * SIZE] = bytes(self.data)
        self.prod += (len(record) + 7) & ~7
        struct.pack_into("<Q", self.map, PAGE, self.prod)


def _event(i: int) -> AcceptEvent:
    return AcceptEvent(ts_ns=1000 + i, pid=7, tid=7, comm="w", family=socket.AF_INET, local_addr="127.0.0.1",
                       local_port=80, peer_addr="127.0.0.1", peer_port=i, queue_wait_ns=i, backlog=0,
                       backlog_limit=8, listener_inode=9, source=EventSource.SYSCALL_EXIT)


@pytest.fixture
def ring() -> Iterator[tuple[FakeRing, EventRing]]:
    fake = FakeRing()
    reader = EventRing(fake.fd, SIZE)
    yield fake, reader
    reader.close()
    fake.map.close()
    os.close(fake.fd)


def _ports(block: bytes) -> list[int]:
    return [decode_event(block[i + HEADER.size:i + STRIDE]).peer_port for i in range(0, len(block), STRIDE)]


def test_records_in_order_across_wraparounds(ring: tuple[FakeRing, EventRing]) -> None:
    fake, reader = ring
    seen: list[int] = []
    for i in range(200):  # 200 records of 112 bytes through a 4096-byte ring
        fake.put(pack_event(_event(i)))
        if i % 13 == 12:
            seen += _ports(reader.drain())
    seen += _ports(reader.drain())
    assert seen == list(range(200))
    assert reader.drain() == b""


def test_busy_record_ends_the_block_until_committed(ring: tuple[FakeRing, EventRing]) -> None:
    fake, reader = ring
    fake.put(pack_event(_event(1)))
    busy_at = fake.prod
    fake.put(pack_event(_event(2)), length=RECORD_SIZE | BUSY_BIT)
    fake.put(pack_event(_event(3)))
    assert _ports(reader.drain()) == [1]
    struct.pack_into("<I", fake.data, busy_at % SIZE, RECORD_SIZE)  # committed
    fake.map[2 * PAGE:2 * PAGE + 2 * SIZE] = bytes(fake.data) * 2
    assert _ports(reader.drain()) == [2, 3]


def test_discarded_and_foreign_records_are_skipped(ring: tuple[FakeRing, EventRing]) -> None:
    fake, reader = ring
    fake.put(pack_event(_event(1)))
    fake.put(pack_event(_event(2)), length=RECORD_SIZE | DISCARD_BIT)
    fake.put(HEADER.pack(12, 0) + b"x" * 12)  # another size: 8 + 12 bytes, padded to 24
    fake.put(pack_event(_event(3)))
    assert _ports(reader.drain()) == [1, 3]
    assert reader.skipped == 2


def test_bad_size_is_refused() -> None:
    with pytest.raises(RingError, match="power-of-2"):
        EventRing(-1, 3 * PAGE)
