"""daemon/eventdrain.py: the drain thread's blocks reach the writer and the aggregator, the last
records are drained at stop, and an error in the thread is raised in the main thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from accept_watch.daemon import eventdrain
from accept_watch.daemon.eventdrain import EventDrainer
from accept_watch.daemon.export import EventWriter, ExportError
from accept_watch.probes.eventring import pack_event
from accept_watch.probes.records import AcceptEvent, EventSource


def _record(i: int) -> bytes:
    return pack_event(AcceptEvent(
        ts_ns=10**9 + i, pid=7, tid=7, comm="w", family=socket.AF_INET, local_addr="127.0.0.1",
        local_port=80, peer_addr="127.0.0.1", peer_port=1000 + i, queue_wait_ns=5, backlog=0,
        backlog_limit=8, listener_inode=9, source=EventSource.SYSCALL_EXIT))


class _Probes:
    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.lock = threading.Lock()
        self.opened = False

    def open_events(self) -> None:
        self.opened = True

    def drain_events(self) -> bytes:
        with self.lock:
            block, self.pending = b"".join(self.pending), []
        return block


class _Aggregator:
    def __init__(self) -> None:
        self.blocks: list[bytes] = []

    def add_event_block(self, block: bytes, ports: Any) -> None:
        self.blocks.append(block)


def test_blocks_reach_writer_and_aggregator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventdrain, "DRAIN_EVERY_S", 0.01)
    probes, agg = _Probes(), _Aggregator()
    writer = EventWriter(tmp_path / "e.ndjson")
    drainer = EventDrainer(probes, writer, agg, None)  # type: ignore[arg-type]
    drainer.start()
    probes.pending.append(_record(1))
    deadline = time.monotonic() + 5
    while not agg.blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    probes.pending.append(_record(2))  # arrives at the end: drained by stop()
    drainer.stop()
    writer.close()
    assert probes.opened and writer.written == 2 and len(agg.blocks) == 2
    assert len((tmp_path / "e.ndjson").read_text().splitlines()) == 2


def test_an_error_in_the_thread_is_raised_by_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventdrain, "DRAIN_EVERY_S", 0.01)
    probes = _Probes()
    writer = EventWriter(tmp_path / "e.ndjson")
    writer.close()  # writing now fails: "event log ... is closed"
    drainer = EventDrainer(probes, writer, _Aggregator(), None)  # type: ignore[arg-type]
    drainer.start()
    probes.pending.append(_record(1))
    deadline = time.monotonic() + 5
    while drainer._error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ExportError, match="is closed"):
        drainer.check()
    drainer.stop()  # the thread has ended; nothing left to drain
