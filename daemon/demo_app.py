"""The demo's bundled app: answers "<pid>\\n" after a short pause, as WSGI `app` and ASGI `asgi_app`.

The pause ($ACCEPT_WATCH_DEMO_SLEEP_MS, default 2 ms) stands in for real work, so that under the
demo's heavier load phases connections wait in the accept queue and the view has something to show.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

SLEEP_MS_ENV = "ACCEPT_WATCH_DEMO_SLEEP_MS"


def _sleep_s() -> float:
    raw = os.environ.get(SLEEP_MS_ENV, "2")
    try:
        ms = float(raw)
    except ValueError:
        raise RuntimeError(f"{SLEEP_MS_ENV}={raw!r} is not a number") from None
    if ms < 0:
        raise RuntimeError(f"{SLEEP_MS_ENV}={raw!r} is negative")
    return ms / 1000.0


SLEEP_S = _sleep_s()


def _body() -> bytes:
    return f"{os.getpid()}\n".encode()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if SLEEP_S:
        time.sleep(SLEEP_S)
    body = _body()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        raise RuntimeError(f"demo app serves HTTP only, not {scope['type']!r}")
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
