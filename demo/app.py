"""The demo's bundled app: answers "<pid>\\n" after a short pause, as WSGI `app` and ASGI `asgi_app`.

The pause ($ACCEPT_WATCH_DEMO_SLEEP_MS, default 2 ms) stands in for real work, so that under the
demo's heavier load phases connections wait in the accept queue and the view has something to show.
The same answer, with a hook run before it, is the tests' ground-truth app (tests/apps/pidapp.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

SLEEP_MS_ENV = "ACCEPT_WATCH_DEMO_SLEEP_MS"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def sleep_s_from_env(name: str, default_ms: str) -> float:
    """A per-request pause from an environment variable in ms; checked at import so that a
    misconfigured worker fails to boot instead of answering 500s."""
    raw = os.environ.get(name, default_ms) or default_ms
    try:
        ms = float(raw)
    except ValueError:
        raise RuntimeError(f"{name}={raw!r} is not a number") from None
    if ms < 0:
        raise RuntimeError(f"{name}={raw!r} is negative")
    return ms / 1000.0


def _body() -> bytes:
    return f"{os.getpid()}\n".encode()


def wsgi(sleep_s: float, before: Callable[[dict[str, Any]], None] | None = None) -> WsgiApp:
    """The WSGI app: before(environ), the pause, then "<pid>\\n"."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if before is not None:
            before(environ)
        if sleep_s:
            time.sleep(sleep_s)
        body = _body()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def asgi(sleep_s: float, before: Callable[[Scope], None] | None = None) -> AsgiApp:
    """The ASGI app (uvicorn): lifespan handled, before(scope), the pause, then "<pid>\\n"."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            raise RuntimeError(f"the app serves HTTP only, not {scope['type']!r}")
        if before is not None:
            before(scope)
        if sleep_s:
            await asyncio.sleep(sleep_s)
        body = _body()
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        })
        await send({"type": "http.response.body", "body": body})

    return app


SLEEP_S = sleep_s_from_env(SLEEP_MS_ENV, "2")
app = wsgi(SLEEP_S)
asgi_app = asgi(SLEEP_S)
