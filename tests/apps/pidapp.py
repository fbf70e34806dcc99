"""Ground-truth app: every request appends "<pid> <monotonic_ns> <peer port>\\n" to
$PIDAPP_RECORD_DIR/<pid>.log and answers 200 "<pid>\\n".

One file per worker process so that lines of different workers never interleave; each line goes out
in one write() on an O_APPEND descriptor, so a line is either wholly in the file or not at all.
time.monotonic_ns() is CLOCK_MONOTONIC, the clock bpf_ktime_get_ns() reads, so the kernel's accept
timestamps and these lines can be compared directly.

The line is written before the response is sent: once a client has read its response, its request is
on disk. Optional $PIDAPP_SLEEP_MS delays each request (to build up accept queues).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

RECORD_DIR_ENV = "PIDAPP_RECORD_DIR"
SLEEP_MS_ENV = "PIDAPP_SLEEP_MS"
NO_PEER_PORT_ENV = "PIDAPP_NO_PEER_PORT"


def _record_dir() -> str:
    path = os.environ.get(RECORD_DIR_ENV)
    if not path:
        raise RuntimeError(f"{RECORD_DIR_ENV} is not set: the pid app has nowhere to record requests")
    if not os.path.isdir(path):
        raise RuntimeError(f"{RECORD_DIR_ENV}={path!r} is not a directory")
    return path


def _sleep_s() -> float:
    raw = os.environ.get(SLEEP_MS_ENV, "0") or "0"
    try:
        ms = float(raw)
    except ValueError:
        raise RuntimeError(f"{SLEEP_MS_ENV}={raw!r} is not a number") from None
    if ms < 0:
        raise RuntimeError(f"{SLEEP_MS_ENV}={raw!r} is negative")
    return ms / 1000.0


# Checked at import so that a misconfigured worker fails to boot instead of answering 500s.
RECORD_DIR = _record_dir()
SLEEP_S = _sleep_s()

# (pid, fd): the pid guards against a descriptor inherited across fork (gunicorn --preload).
_fd: tuple[int, int] | None = None


def record(peer_port: int) -> None:
    """Append this process's ground-truth line for one request."""
    global _fd
    pid = os.getpid()
    if _fd is None or _fd[0] != pid:
        path = os.path.join(RECORD_DIR, f"{pid}.log")
        _fd = (pid, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644))
    os.write(_fd[1], f"{pid} {time.monotonic_ns()} {peer_port}\n".encode())


def _body() -> bytes:
    return f"{os.getpid()}\n".encode()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """WSGI entry point."""
    # gunicorn always sets REMOTE_PORT for TCP peers; a KeyError here means a broken setup, loudly.
    # tornado's WSGIContainer (gunicorn's tornado worker) never sets it: its launcher says so and the
    # peer port is recorded as 0.
    if os.environ.get(NO_PEER_PORT_ENV) == "1":
        record(int(environ.get("REMOTE_PORT") or 0))
    else:
        record(int(environ["REMOTE_PORT"]))
    if SLEEP_S:
        time.sleep(SLEEP_S)
    body = _body()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI entry point (uvicorn)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        raise RuntimeError(f"pid app serves HTTP only, not {scope['type']!r}")
    client = scope.get("client")
    if not client:
        raise RuntimeError("ASGI scope has no client address: cannot record the peer port")
    record(int(client[1]))
    if SLEEP_S:
        await asyncio.sleep(SLEEP_S)
    body = _body()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
