"""ASGI middleware enforcing the dashboard's security rules before any route runs.

Order matters: Host (DNS-rebinding defence) -> size limits -> method -> token. It is a plain ASGI
middleware, not Starlette's BaseHTTPMiddleware, so that the Server-Sent Events stream passes through
untouched.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection

from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ANY_HOST = "*"
# Generous for every real URL of this API (asset names are <= 64 characters, ~770 bytes percent-encoded).
MAX_PATH_BYTES = 4096
MAX_QUERY_BYTES = 4096
MAX_HEADER_BYTES = 16384  # a browser's request, cookies included, is far below this
READ_METHODS = frozenset({"GET", "HEAD"})

# Same-origin only: the page loads nothing from elsewhere, so a strict policy costs nothing. Inline
# style *attributes* are not used (styles are set through the CSSOM, which CSP allows).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the token may sit in the page URL: never leak it onwards
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CSP.encode()),
    (b"cache-control", b"no-store"),
)


def check_token(token: str) -> str:
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError("dashboard token must be non-empty printable text without spaces")
    return token


def normalise_hosts(allowed_hosts: Collection[str], token: str | None) -> frozenset[str]:
    hosts = frozenset(h.strip().lower() for h in allowed_hosts)
    if not hosts or "" in hosts:
        raise ValueError("allowed_hosts must list at least one non-empty host[:port]")
    if ANY_HOST in hosts and token is None:
        raise ValueError("accepting any Host header requires a token (DNS rebinding defence)")
    return hosts


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        allowed_hosts: Collection[str],
        open_paths: Collection[str] = ("/healthz",),
    ) -> None:
        self.app = app
        self.token = None if token is None else check_token(token).encode()
        self.allowed_hosts = normalise_hosts(allowed_hosts, token)
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            # No WebSocket endpoint exists; refuse the handshake outright.
            await send({"type": "websocket.close", "code": 1008})
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, detail, extra = refusal
            await _send_error(send, status, detail, extra)
            return
        await self.app(scope, receive, _with_security_headers(send))

    def _refusal(self, scope: Scope) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        headers = Headers(scope=scope)
        hosts = headers.getlist("host")
        if len(hosts) != 1 or not self._host_allowed(hosts[0]):
            return 400, "Host header not allowed", []
        if sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            return 431, "request headers too large", []
        if len(scope.get("raw_path") or scope["path"].encode()) > MAX_PATH_BYTES:
            return 414, "path too long", []
        if len(scope.get("query_string", b"")) > MAX_QUERY_BYTES:
            return 414, "query string too long", []
        if scope["method"] not in READ_METHODS:
            return 405, "read-only API: only GET and HEAD are allowed", [(b"allow", b"GET, HEAD")]
        if (
            self.token is not None
            and scope["path"] not in self.open_paths
            and not self._authorised(scope, headers)
        ):
            return 401, "missing or wrong token", [(b"www-authenticate", b'Bearer realm="accept-watch"')]
        return None

    def _host_allowed(self, host: str) -> bool:
        return ANY_HOST in self.allowed_hosts or host.strip().lower() in self.allowed_hosts

    def _authorised(self, scope: Scope, headers: Headers) -> bool:
        assert self.token is not None
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and _same(value.strip(), self.token):
            return True
        query_token = QueryParams(scope.get("query_string", b"")).get("token")
        return query_token is not None and _same(query_token, self.token)


def _same(given: str, expected: bytes) -> bool:
    # Compare bytes: compare_digest rejects non-ASCII str, and a client may send anything.
    return secrets.compare_digest(given.encode("utf-8", "surrogateescape"), expected)


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {name.lower() for name, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


async def _send_error(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
        *SECURITY_HEADERS,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
