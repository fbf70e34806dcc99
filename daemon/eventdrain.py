"""The per-connection stream's consumer: drains the BPF ring buffer on its own thread.

The BPF side does not wake anyone per record (BPF_RB_NO_WAKEUP), so the ring must be drained on a
clock, and that clock must not stop while the main loop does its slower work (a process-tree scan
walks every process of the machine: under load it took seconds, and the ring overflowed at 10 k/s).
Each block goes to the --events file and to the dashboard's recent events. An error here (the events
file cannot be written) is raised again in the main loop by check().
"""

from __future__ import annotations

import threading
from typing import Any

from . import export
from .stats import Aggregator

# The ring holds defines.RINGBUF_PAGES pages (2 MiB, ~20 k records): ~0.5 s at 40 k accepts/s.
DRAIN_EVERY_S = 0.05


class EventDrainer:
    def __init__(self, probes: Any, writer: export.EventWriter | None, aggregator: Aggregator,
                 ports: set[int] | None) -> None:
        self._probes = probes
        self._writer = writer
        self._aggregator = aggregator
        self._ports = frozenset(ports) if ports else None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="accept-watch-events")

    def start(self) -> None:
        self._probes.open_events()
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(DRAIN_EVERY_S):
                self.drain_once()
        except BaseException as exc:  # handed to the main thread by check()
            self._error = exc

    def drain_once(self) -> None:
        block = self._probes.drain_events()
        if not block:
            return
        if self._writer is not None:
            self._writer.write_block(block)
        self._aggregator.add_event_block(block, self._ports)

    def check(self) -> None:
        """Raise in the caller's thread what stopped the drain thread, if anything did."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop(self) -> None:
        """Stop the thread, then drain what is left (the final read after the load)."""
        if not self._thread.is_alive() and not self._thread.ident:
            return
        self._stop.set()
        self._thread.join()
        self.check()
        self.drain_once()
