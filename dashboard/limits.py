"""Bounds that keep the dashboard answering under hostile clients (slowloris, stream floods).

uvicorn's own limit_concurrency answers 503 on *every* route once N connections are open, so 64 idle
sockets locked everyone out, /healthz included. Instead:
- a connection must deliver a complete request head within HEADER_TIMEOUT_S (first request and every
  keep-alive one after it), or it is closed;
- connections still waiting for a request head are capped per client address and in total; a new
  connection beyond a cap closes the *oldest* waiting one (if it has waited EVICT_AFTER_S already:
  a burst of fresh connections is not a slow client), so slow sockets only ever displace their own
  kind and a real request always gets through;
- at most MAX_CONNECTIONS open connections: beyond it the oldest waiting one goes, or the new one;
- Server-Sent Events streams (the only long-lived responses) are capped in total (503) and per client
  (429): only a *new* stream is refused, every other route keeps working.
Counting never depends on any of this: the dashboard runs in its own thread and only reads documents.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
EVICT_AFTER_S = 0.5
MAX_CONNECTIONS = 512
MAX_WAITING = 128
MAX_WAITING_PER_CLIENT = 16
MAX_STREAMS = 32
MAX_STREAMS_PER_CLIENT = 8


class StreamSlots:
    """Counts open SSE streams; acquired from a worker thread, released from the event loop."""

    def __init__(self, total: int = MAX_STREAMS, per_client: int = MAX_STREAMS_PER_CLIENT) -> None:
        self.total, self.per_client = total, per_client
        self._lock = threading.Lock()
        self._by_client: dict[str, int] = {}

    def open(self) -> int:
        with self._lock:
            return sum(self._by_client.values())

    def acquire(self, client: str) -> int:
        """0 when granted, else the HTTP status of the refusal (503 all full, 429 this client's full)."""
        with self._lock:
            if sum(self._by_client.values()) >= self.total:
                return 503
            if self._by_client.get(client, 0) >= self.per_client:
                return 429
            self._by_client[client] = self._by_client.get(client, 0) + 1
            return 0

    def release(self, client: str) -> None:
        with self._lock:
            left = self._by_client.get(client, 0) - 1
            if left > 0:
                self._by_client[client] = left
            else:
                self._by_client.pop(client, None)


class ConnectionLimits:
    """Connection bookkeeping for one server; touched only from its event loop thread."""

    def __init__(self, header_timeout_s: float = HEADER_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
                 max_waiting: int = MAX_WAITING,
                 max_waiting_per_client: int = MAX_WAITING_PER_CLIENT) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.max_waiting = max_waiting
        self.max_waiting_per_client = max_waiting_per_client
        self.streams = StreamSlots()
        self.connections: set[Any] = set()
        self.waiting: OrderedDict[Any, tuple[str, float]] = OrderedDict()  # oldest first
        self.evicted = 0

    def wait(self, conn: Any, now: float) -> None:
        self.waiting[conn] = (conn.client_host, now)
        self.waiting.move_to_end(conn)

    def _oldest(self, now: float, host: str | None = None, min_age: float = EVICT_AFTER_S) -> Any:
        for c, (h, since) in self.waiting.items():
            if now - since < min_age:
                return None  # in order: every later one is younger still
            if host is None or h == host:
                return c
        return None

    def _evict(self, conn: Any) -> None:
        self.waiting.pop(conn, None)
        self.evicted += 1
        conn.transport.close()

    def opened(self, conn: Any, now: float) -> bool:
        """Register a new connection (already waiting for its head); False: close it at once."""
        self.connections.add(conn)
        host = conn.client_host
        mine = sum(1 for h, _ in self.waiting.values() if h == host)
        self.wait(conn, now)
        if mine >= self.max_waiting_per_client and (old := self._oldest(now, host)) is not None:
            self._evict(old)
        if len(self.waiting) > self.max_waiting and (old := self._oldest(now)) is not None:
            self._evict(old)
        if len(self.connections) > self.max_connections:
            old = self._oldest(now, min_age=0.0)
            if old is None or old is conn:
                return False
            self._evict(old)
        return True

    def closed(self, conn: Any) -> None:
        self.connections.discard(conn)
        self.waiting.pop(conn, None)


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head deadline and the caps of `limits`."""

    class GuardedH11Protocol(H11Protocol):
        client_host = "?"
        _deadline: asyncio.TimerHandle | None = None
        _seen_cycle: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.client_host = self.client[0] if self.client else "?"
            self._arm()
            if not limits.opened(self, self.loop.time()):
                self._disarm()
                transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            limits.closed(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._head_seen()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.cycle is self._seen_cycle:  # idle keep-alive: the next head has a deadline too
                self._arm()
                limits.wait(self, self.loop.time())
            else:
                self._head_seen()  # a pipelined request was already parsed

        def _head_seen(self) -> None:
            if self.cycle is not None and self.cycle is not self._seen_cycle:
                self._seen_cycle = self.cycle
                self._disarm()
                limits.waiting.pop(self, None)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            limits.waiting.pop(self, None)
            limits.evicted += 1
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
