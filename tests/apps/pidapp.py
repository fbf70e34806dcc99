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

import os
import time
from typing import Any

from demo.app import Scope, asgi, sleep_s_from_env, wsgi

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


# Checked at import so that a misconfigured worker fails to boot instead of answering 500s.
RECORD_DIR = _record_dir()
SLEEP_S = sleep_s_from_env(SLEEP_MS_ENV, "0")

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


def _record_wsgi(environ: dict[str, Any]) -> None:
    # gunicorn always sets REMOTE_PORT for TCP peers; a KeyError here means a broken setup, loudly.
    # tornado's WSGIContainer (gunicorn's tornado worker) never sets it: its launcher says so and the
    # peer port is recorded as 0.
    if os.environ.get(NO_PEER_PORT_ENV) == "1":
        record(int(environ.get("REMOTE_PORT") or 0))
    else:
        record(int(environ["REMOTE_PORT"]))


def _record_asgi(scope: Scope) -> None:
    client = scope.get("client")
    if not client:
        raise RuntimeError("ASGI scope has no client address: cannot record the peer port")
    record(int(client[1]))


# The demo's app (demo/app.py) with the record written before the response.
app = wsgi(SLEEP_S, _record_wsgi)
asgi_app = asgi(SLEEP_S, _record_asgi)
