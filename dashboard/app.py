"""The dashboard's HTTP application: page, JSON snapshot, NDJSON events, SSE stream, Prometheus metrics.

Read-only by construction: every route is GET (plus HEAD), and RequestGuard refuses anything else
before routing. No CORS middleware is installed, so browsers keep other origins out.
"""

from __future__ import annotations

import html
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Collection
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

import anyio
from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from accept_watch.daemon.document import Document, StreamedDocument
from accept_watch.dashboard.guard import RequestGuard, check_token, normalise_hosts
from accept_watch.dashboard.limits import ConnectionLimits
from accept_watch.dashboard.metrics import make_registry
from accept_watch.dashboard.schema import ErrorDetail, Health
from accept_watch.dashboard.source import DashboardSource

EVENTS_DEFAULT = 100
EVENTS_MAX = 1000
STATIC_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
ASSET_QUERY_MARK = "{{ASSET_QUERY}}"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"

SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"const": "snapshot"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/StreamedSnapshot"},
        },
    },
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "Host header not allowed"},
    401: {"model": ErrorDetail, "description": "Token required (when the dashboard has one)"},
    429: {"model": ErrorDetail, "description": "This client holds too many live streams (/api/stream)"},
    503: {"model": ErrorDetail, "description": "All live streams are taken (/api/stream)"},
    414: {"model": ErrorDetail, "description": "Path or query string too long"},
    431: {"model": ErrorDetail, "description": "Request headers too large"},
}


def _dumps(doc: Any) -> str:
    # allow_nan=False: NaN/Infinity are not JSON and would break every client; fail loudly instead.
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def _load_static() -> dict[str, bytes]:
    folder = resources.files("accept_watch.dashboard") / "static"
    return {name: (folder / name).read_bytes() for name in ("index.html", *STATIC_TYPES)}


def create_app(
    source: DashboardSource,
    *,
    token: str | None,
    allowed_hosts: Collection[str],
    stream_interval: float = 1.0,
    limits: ConnectionLimits | None = None,
) -> FastAPI:
    """Build the ASGI app. `allowed_hosts` holds exact Host header values ("127.0.0.1:8123"); "*" accepts
    any Host and is only allowed together with a token."""
    # Validate now: Starlette builds the middleware stack lazily, on the first request.
    if token is not None:
        check_token(token)
    allowed_hosts = normalise_hosts(allowed_hosts, token)
    if not 0 < stream_interval <= 1.0:
        raise ValueError(f"stream_interval must be in (0, 1] seconds, got {stream_interval}")
    assets = _load_static()
    asset_query = "" if token is None else "?token=" + quote(token, safe="")
    page = assets["index.html"].decode().replace(ASSET_QUERY_MARK, html.escape(asset_query)).encode()
    registry = make_registry(source.snapshot)
    stopping = threading.Event()
    slots = (limits or ConnectionLimits()).streams

    app = FastAPI(
        title="accept-watch dashboard",
        version="1",
        description="Read-only view of one accept-watch session: which worker accepted each connection.",
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN: not shipped.
        redoc_url=None,
    )
    app.state.stopping = stopping  # DashboardServer sets it so open SSE streams end before shutdown

    def page_response() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    def static_response(name: str) -> Response:
        if name not in STATIC_TYPES:
            raise HTTPException(404, "no such asset")
        return Response(assets[name], media_type=STATIC_TYPES[name])

    def snapshot_response(download: bool) -> Response:
        doc = source.snapshot()
        headers = {}
        if download:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            pid = "".join(ch for ch in str(doc.get("master_pid", "")) if ch.isdigit()) or "unknown"
            headers["content-disposition"] = f'attachment; filename="accept-watch-{pid}-{stamp}.json"'
        return Response(_dumps(doc), media_type="application/json", headers=headers)

    def events_response(limit: int) -> Response:
        events = source.recent_events(limit)[-limit:]
        body = "".join(_dumps(e) + "\n" for e in events)
        return Response(body, media_type=NDJSON)

    def metrics_response() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def snapshot_stream() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        while not stopping.is_set():
            doc = await run_in_threadpool(source.snapshot)
            # The page does not use `transitions` (up to workers² entries): leave them out of every push.
            doc = {k: v for k, v in doc.items() if k != "transitions"}
            # One compact line of JSON per event: json.dumps never emits a raw newline.
            yield b"event: snapshot\ndata: " + _dumps(doc).encode() + b"\n\n"
            await anyio.sleep(stream_interval)

    @app.get("/", response_class=Response, responses={200: {"content": {"text/html": {}}}, **_ERRORS})
    def index() -> Response:
        """The live dashboard page."""
        return page_response()

    @app.get(
        "/static/{name}",
        response_class=Response,
        responses={
            200: {"content": {"text/javascript": {}, "text/css": {}}},
            404: {"model": ErrorDetail, "description": "Unknown asset"},
            **_ERRORS,
        },
    )
    def static(name: Annotated[str, Path(max_length=64)]) -> Response:
        """The page's script and stylesheet (shipped with the package, nothing from a CDN)."""
        return static_response(name)

    @app.get(
        "/api/snapshot",
        response_class=Response,
        responses={200: {"model": Document, "description": "The accept-watch/1 document"}, **_ERRORS},
    )
    def snapshot(
        download: Annotated[bool, Query(description="add Content-Disposition: attachment")] = False,
    ) -> Response:
        """The full accept-watch/1 document, built fresh for each request."""
        return snapshot_response(download)

    @app.get(
        "/api/events",
        response_class=Response,
        responses={
            200: {
                "description": "Recent per-connection events, one JSON object per line, newest last "
                "(empty when the per-connection stream is off)",
                "content": {NDJSON: {"schema": {"type": "string"}}},
            },
            **_ERRORS,
        },
    )
    def events(
        limit: Annotated[
            int, Query(ge=1, le=EVENTS_MAX, description="how many events at most")
        ] = EVENTS_DEFAULT,
    ) -> Response:
        """Recent per-connection accept events as NDJSON."""
        return events_response(limit)

    @app.get(
        "/api/stream",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-Sent Events: an `event: snapshot` whose data is the accept-watch/1 "
                f"document without `transitions`, every {stream_interval:g} s",
                # OpenAPI 3.1 reading: for text/event-stream, `schema` describes one event.
                "content": {SSE: {"schema": SSE_EVENT_SCHEMA}},
            },
            **_ERRORS,
        },
    )
    def stream(request: Request) -> Response:
        """Push channel for the page: the snapshot document as Server-Sent Events. Streams are capped
        (503 when all are taken, 429 when this client holds its share): only a new stream is refused."""
        client = request.client.host if request.client else "?"
        refused = slots.acquire(client)
        if refused:
            detail = ("too many live streams; poll /api/snapshot instead" if refused == 503
                      else "this client holds too many live streams")
            return JSONResponse({"detail": detail}, status_code=refused, headers={"retry-after": "10"})
        release = _once(lambda: slots.release(client))
        body = _released_when_done(snapshot_stream(), release)
        # Also when the stream is never iterated (client gone before the body): freed with the generator.
        weakref.finalize(body, release)
        return StreamingResponse(body, media_type=SSE, headers={"x-accel-buffering": "no"})

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
            **_ERRORS,
        },
    )
    def metrics() -> Response:
        """Prometheus text exposition of the current snapshot."""
        return metrics_response()

    @app.get("/healthz", response_model=Health, responses={k: _ERRORS[k] for k in (400, 414, 431)})
    def healthz() -> dict[str, str]:
        """Liveness probe; needs no token."""
        return {"status": "ok"}

    # HEAD twins, left out of the schema (HEAD is GET without a body). The stream's twin must not start
    # an endless generator whose body the server would discard.
    for path, handler in (
        ("/", index),
        ("/api/snapshot", snapshot),
        ("/api/events", events),
        ("/metrics", metrics),
        ("/healthz", healthz),
        ("/static/{name}", static),
    ):
        app.add_api_route(path, handler, methods=["HEAD"], include_in_schema=False)
    app.add_api_route(
        "/api/stream", lambda: Response(media_type=SSE), methods=["HEAD"], include_in_schema=False
    )

    _customise_openapi(app, token)
    app.add_middleware(RequestGuard, token=token, allowed_hosts=allowed_hosts)
    return app


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    lock = threading.Lock()
    done = False

    def run() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        fn()

    return run


async def _released_when_done(body: AsyncIterator[bytes],
                              release: Callable[[], None]) -> AsyncIterator[bytes]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        release()


def _customise_openapi(app: FastAPI, token: str | None) -> None:
    """Add what FastAPI cannot infer: the streamed document's schema and, with a token, how to pass it."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        streamed = StreamedDocument.model_json_schema(
            by_alias=True, mode="serialization", ref_template="#/components/schemas/{model}"
        )
        for name, definition in streamed.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components["StreamedSnapshot"] = streamed
        if token is not None:
            schema["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "queryToken": {"type": "apiKey", "in": "query", "name": "token"},
            }
            for path, item in schema["paths"].items():
                if path != "/healthz":
                    for operation in item.values():
                        operation["security"] = [{"bearer": []}, {"queryToken": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
