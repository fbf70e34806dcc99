"""Run the dashboard app with uvicorn in a background thread of the accept-watch process.

The web stack (uvicorn, starlette, fastapi: ~0.2-0.4 s of imports) is imported by start(), not here:
the daemon binds the dashboard's address before attaching its probes, to refuse a bad one early, and
should not pay for the imports until the probes count.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from accept_watch.dashboard.source import DashboardSource

if TYPE_CHECKING:
    import uvicorn

    from accept_watch.dashboard.limits import ConnectionLimits

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


class DashboardError(RuntimeError):
    """The dashboard could not start (bad listen address, port in use...)."""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: could resolve anywhere, treat as exposed


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class DashboardServer:
    """The dashboard on `listen_host:port` (port 0 picks a free one).

    On a loopback address, Host headers must name the loopback address and the real port (DNS
    rebinding defence) and a token is optional. Anywhere else a token is mandatory (one is generated
    when none is given) and any Host is accepted: an attacker's page cannot know the token, and the
    names a remote browser uses for this machine cannot be listed reliably.
    """

    def __init__(
        self,
        source: DashboardSource,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        stream_interval: float = 1.0,
        log_level: str = "warning",
        limits: ConnectionLimits | None = None,
        app_factory: Callable[..., Any] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise DashboardError(f"dashboard port must be 0..65535, got {port}")
        self.source = source
        self.listen_host = listen_host.strip("[]")
        self.loopback = is_loopback(self.listen_host)
        if token is not None:
            from accept_watch.dashboard.guard import check_token

            try:
                check_token(token)
            except ValueError as exc:
                raise DashboardError(str(exc)) from None
        elif not self.loopback:
            token = secrets.token_urlsafe(24)
        self.token = token
        self._requested_port = port
        self._stream_interval = stream_interval
        self._log_level = log_level
        self._limits = limits
        self._app_factory = app_factory  # `accept-watch serve` runs its own app (dashboard/serveapp.py);
        # None: the dashboard's app (dashboard/app.py)
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._bound: tuple[str, int] | None = None
        self._stopping: threading.Event | None = None

    @property
    def port(self) -> int:
        if self._bound is None:
            raise DashboardError("dashboard is not started")
        return self._bound[1]

    @property
    def url(self) -> str:
        """Where to open the page (with ?token=... when a token is set)."""
        if self._bound is None:
            raise DashboardError("dashboard is not started")
        address, port = self._bound
        if self.loopback:
            host = address
        elif ipaddress.ip_address(address).is_unspecified:
            host = socket.gethostname()
        else:
            host = address
        query = "" if self.token is None else "?token=" + quote(self.token, safe="")
        return f"http://{_url_host(host)}:{port}/{query}"

    def allowed_hosts(self, port: int) -> set[str]:
        from accept_watch.dashboard.guard import ANY_HOST

        if not self.loopback:
            return {ANY_HOST}
        return {f"{name}:{port}" for name in LOOPBACK_NAMES}

    def _bind(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(
                self.listen_host, self._requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise DashboardError(
                f"cannot resolve dashboard address {self.listen_host!r}: {exc.strerror}"
            ) from None
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            where = f"{_url_host(self.listen_host)}:{self._requested_port}"
            raise DashboardError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        sock.set_inheritable(False)
        return sock

    def bind(self) -> None:
        """Take the address now (refusing a port in use or an address not on this host) without serving
        yet: the daemon calls this before attaching any probe, start() later."""
        if self._sock is None:
            self._sock = self._bind()
            self._sock.listen(128)  # hold the port from now on (a bound, non-listening port can be shared)

    def close(self) -> None:
        """Release a bound address that was never started (or stop a started server)."""
        if self._thread is not None:
            self.stop()
        elif self._sock is not None:
            self._sock.close()
            self._sock = None

    def start(self, timeout: float = 10.0) -> None:
        """Bind (unless bind() did), serve in a daemon thread, return once it accepts connections."""
        import uvicorn

        from accept_watch.dashboard.limits import ConnectionLimits, guarded_protocol

        if self._thread is not None:
            raise DashboardError("dashboard already started")
        self.bind()
        sock = self._sock
        assert sock is not None
        address, port = sock.getsockname()[:2]
        limits = self._limits or ConnectionLimits()
        if self._app_factory is None:
            from accept_watch.dashboard.app import create_app

            self._app_factory = create_app
        app = self._app_factory(
            self.source,
            token=self.token,
            allowed_hosts=self.allowed_hosts(port),
            stream_interval=self._stream_interval,
            limits=limits,
        )
        config = uvicorn.Config(
            app,
            ws="none",
            lifespan="off",
            log_config=None,  # leave the CLI's logging set-up alone
            log_level=self._log_level,
            access_log=False,
            server_header=False,
            proxy_headers=False,  # never trust X-Forwarded-*: nothing sits in front of us
            # No limit_concurrency: past it uvicorn answers 503 on every route, /healthz included, so
            # 64 idle sockets locked everyone out. ConnectionLimits bounds connections instead
            # (header-read timeout, per-client caps, oldest idle evicted) and the app caps SSE streams.
            http=guarded_protocol(limits),
            timeout_graceful_shutdown=3,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="accept-watch-dashboard", daemon=True
        )
        self._sock, self._server, self._thread = sock, server, thread
        self._stopping = app.state.stopping
        self._bound = (address, port)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                self._cleanup()
                raise DashboardError("dashboard server exited during start-up")
            if time.monotonic() > deadline:
                self.stop()
                raise DashboardError(f"dashboard server did not start within {timeout:g} s")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        assert self._server is not None and self._stopping is not None
        self._stopping.set()  # ends open SSE streams, which would otherwise hold shutdown up
        self._server.should_exit = True
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        self._cleanup()
        if alive:
            raise DashboardError(f"dashboard server did not stop within {timeout:g} s")

    def _cleanup(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._server = self._thread = None
        self._bound = None

    def __enter__(self) -> DashboardServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
