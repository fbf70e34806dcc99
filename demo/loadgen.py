"""A small built-in HTTP load generator (for the demo, and the tests' client helper).

One TCP connection per request (HTTP/1.0, Connection: close, no keep-alive, no retries), so every
request is exactly one accept() on the server: the number the kernel side counts. Plain blocking
sockets in threads keep it dependency-free. Targets must be loopback addresses: this tool only ever
loads servers running on this machine.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

_MAX_RESPONSE = 1 << 20  # stop reading a runaway response (the apps here answer a few bytes)


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """What happened to one connection. Times are time.monotonic_ns() (CLOCK_MONOTONIC)."""

    ok: bool
    local_port: int | None  # the client's ephemeral port (the server's peer port); None if never bound
    connect_start_ns: int  # just before connect()
    connected_ns: int | None  # connect() returned (handshake done; the connection is in the accept queue)
    done_ns: int  # response read to EOF, or the failure
    status: int | None  # HTTP status, if a status line arrived
    error: str | None

    @property
    def latency_s(self) -> float:
        return (self.done_ns - self.connect_start_ns) / 1e9


def resolve_loopback(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    """Resolve `host` once, to a single address, and insist that it is a loopback address.

    Resolving once matters: socket.create_connection() tries every address in turn, which would open
    more connections than requested.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range 1-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    if not ipaddress.ip_address(sockaddr[0]).is_loopback:
        raise ValueError(f"{host!r} resolves to {sockaddr[0]}, not a loopback address: refusing to send load")
    return family, sockaddr


def request_once(
    family: socket.AddressFamily,
    sockaddr: tuple,
    path: str = "/",
    timeout_s: float = 5.0,
    host_header: str = "localhost",
) -> RequestOutcome:
    """Open one connection, send one GET, read the response to EOF, close. Never retries."""
    start = time.monotonic_ns()
    deadline = time.monotonic() + timeout_s
    local_port: int | None = None
    connected: int | None = None
    status: int | None = None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(sockaddr)
        connected = time.monotonic_ns()
        local_port = sock.getsockname()[1]
        request = f"GET {path} HTTP/1.0\r\nHost: {host_header}\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode("ascii"))
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("response not complete within the request timeout")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_RESPONSE:
                raise ValueError(f"response larger than {_MAX_RESPONSE} bytes")
        response = b"".join(chunks)
        status_line = response.split(b"\r\n", 1)[0]
        parts = status_line.split()
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"no HTTP status line in response ({len(response)} bytes)")
        status = int(parts[1])
        ok = status == 200
        error = None if ok else f"HTTP {status}"
    except (OSError, ValueError) as exc:  # TimeoutError and ConnectionError are OSErrors
        ok = False
        error = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    return RequestOutcome(ok, local_port, start, connected, time.monotonic_ns(), status, error)


@dataclass(frozen=True, slots=True)
class LoadStats:
    ok: int
    failed: int
    elapsed_s: float
    last_error: str | None

    @property
    def total(self) -> int:
        return self.ok + self.failed

    @property
    def rate_per_s(self) -> float:
        return self.total / self.elapsed_s if self.elapsed_s > 0 else 0.0


class LoadGenerator:
    """`concurrency` client threads, each opening one connection per request until stopped.

    rate_per_s=None: closed loop (each client sends its next request as soon as the last one ends).
    rate_per_s=R: requests are paced to R per second in total across the clients (never bursting to
    catch up after a slow period); `concurrency` then bounds how many can be in flight.
    """

    def __init__(
        self,
        host: str,
        port: int,
        concurrency: int,
        rate_per_s: float | None = None,
        *,
        path: str = "/",
        timeout_s: float = 5.0,
        stop_event: threading.Event | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if rate_per_s is not None and not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be positive or None, got {rate_per_s}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._family, self._sockaddr = resolve_loopback(host, port)
        self._host_header = f"{host}:{port}"
        self.concurrency = concurrency
        self.rate_per_s = rate_per_s
        self.path = path
        self.timeout_s = timeout_s
        self._stop = stop_event if stop_event is not None else threading.Event()
        self._lock = threading.Lock()
        self._ok = 0
        self._failed = 0
        self._last_error: str | None = None
        self._next_slot = 0.0
        self._threads: list[threading.Thread] = []
        self._started_at: float | None = None
        self._stopped_at: float | None = None

    def start(self) -> LoadGenerator:
        if self._threads:
            raise RuntimeError("load generator already started")
        self._started_at = time.monotonic()
        self._next_slot = self._started_at
        for i in range(self.concurrency):
            t = threading.Thread(target=self._client, name=f"loadgen-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def stop(self) -> LoadStats:
        """Stop the clients and wait for in-flight requests (each bounded by timeout_s)."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 1.0)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"load generator threads did not stop: {', '.join(alive)}")
        if self._stopped_at is None and self._started_at is not None:
            self._stopped_at = time.monotonic()
        return self.stats

    @property
    def stats(self) -> LoadStats:
        with self._lock:
            if self._started_at is None:
                elapsed = 0.0
            else:
                elapsed = (self._stopped_at or time.monotonic()) - self._started_at
            return LoadStats(self._ok, self._failed, elapsed, self._last_error)

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_for_slot(self) -> bool:
        """Rate mode: sleep until this client's send slot. False if stopped meanwhile."""
        if self.rate_per_s is None:
            return not self._stop.is_set()
        with self._lock:
            now = time.monotonic()
            slot = max(self._next_slot, now)  # no catch-up burst after falling behind
            self._next_slot = slot + 1.0 / self.rate_per_s
        delay = slot - time.monotonic()
        if delay > 0:
            return not self._stop.wait(delay)
        return not self._stop.is_set()

    def _client(self) -> None:
        while self._wait_for_slot():
            outcome = request_once(self._family, self._sockaddr, self.path, self.timeout_s, self._host_header)
            with self._lock:
                if outcome.ok:
                    self._ok += 1
                else:
                    self._failed += 1
                    self._last_error = outcome.error
