"""HTTP API of the dashboard: content, metrics, security rules, schema-driven fuzzing, the real server."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from accept_watch.daemon.document import Document as Snapshot
from accept_watch.dashboard import DashboardError, DashboardServer, create_app
from accept_watch.dashboard.demo import SyntheticSource
from accept_watch.dashboard.metrics import LE_BOUNDS_NS, server_name

HOST = "testserver"  # the Host header TestClient (and schemathesis' ASGI client) send
TOKEN = "s3cret-Token_value"


@pytest.fixture
def source() -> SyntheticSource:
    src = SyntheticSource(6, seed=3, ports=(8000, 8443))
    src.advance(20)
    return src


@pytest.fixture
def client(source: SyntheticSource) -> Iterator[TestClient]:
    with TestClient(create_app(source, token=None, allowed_hosts={HOST})) as c:
        yield c


@pytest.fixture
def token_app(source: SyntheticSource) -> FastAPI:
    return create_app(source, token=TOKEN, allowed_hosts={HOST})


def get_routes(app: FastAPI) -> list[str]:
    """Every GET path of the app with path parameters filled in, so new routes are covered too."""
    paths = []
    for route in app.routes:
        if "GET" in getattr(route, "methods", ()):
            paths.append(route.path.replace("{name}", "app.js"))
    return paths


# ---- content --------------------------------------------------------------------------------------


def test_snapshot_equals_source_and_follows_it(client: TestClient, source: SyntheticSource) -> None:
    first = client.get("/api/snapshot")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert first.json() == source.snapshot()
    Snapshot.model_validate(first.json())  # the documented schema describes what we serve
    source.advance(3)
    second = client.get("/api/snapshot").json()
    assert second == source.snapshot()
    assert second["total_accepts"] > first.json()["total_accepts"]
    assert "content-disposition" not in first.headers


def test_snapshot_download_is_an_attachment(client: TestClient, source: SyntheticSource) -> None:
    r = client.get("/api/snapshot", params={"download": "1"})
    assert r.status_code == 200
    disposition = r.headers["content-disposition"]
    assert disposition.startswith("attachment; filename=")
    assert f"accept-watch-{source.master_pid}-" in disposition
    assert r.json() == source.snapshot()


def test_page_and_assets(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/static/app.js"' in page.text and "{{" not in page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "Charting choice: every chart is plain SVG" in js.text[:400]  # the choice is stated up top
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/index.html").status_code == 404  # only the listed assets
    assert client.get("/static/..%2f..%2fapp.py").status_code == 404
    # Nothing is loaded from another origin.
    assert "http://" not in page.text and "https://" not in page.text


def test_token_is_passed_on_to_page_assets(token_app: FastAPI) -> None:
    with TestClient(token_app) as c:
        page = c.get("/", params={"token": TOKEN})
    assert page.status_code == 200
    assert f'src="/static/app.js?token={TOKEN}"' in page.text
    assert f'href="/static/style.css?token={TOKEN}"' in page.text


def test_security_headers(client: TestClient) -> None:
    r = client.get("/")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"


def test_events_are_bounded_ndjson(client: TestClient, source: SyntheticSource) -> None:
    r = client.get("/api/events", params={"limit": 7})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = r.text.splitlines()
    assert [json.loads(line) for line in lines] == source.recent_events(7)
    assert len(lines) == 7 and r.text.endswith("\n")
    default = client.get("/api/events").text.splitlines()
    assert len(default) == 100


def test_events_empty_stream_is_an_empty_body(source: SyntheticSource) -> None:
    class NoEvents(SyntheticSource):
        def recent_events(self, limit: int) -> list[dict]:
            return []

    quiet = NoEvents(2)
    with TestClient(create_app(quiet, token=None, allowed_hosts={HOST})) as c:
        r = c.get("/api/events")
    assert r.status_code == 200 and r.content == b""


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "abc", "", "1.5", "99999999999999999999"])
def test_events_limit_validation(client: TestClient, limit: str) -> None:
    assert client.get("/api/events", params={"limit": limit}).status_code == 422


@pytest.mark.parametrize("limit", [1, 1000])
def test_events_limit_bounds_accepted(client: TestClient, limit: int) -> None:
    assert client.get("/api/events", params={"limit": limit}).status_code == 200


def test_stream_sends_snapshot_events(source: SyntheticSource) -> None:
    app = create_app(source, token=None, allowed_hosts={HOST})
    # TestClient reads a response to its end: a stop request lets the endless stream finish after
    # its first lines (the real-server test below reads it live).
    app.state.stopping.set()
    with TestClient(app) as c:
        r = c.get("/api/stream")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith("retry: ")


# ---- /metrics -------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_metrics_equal_snapshot(client: TestClient, source: SyntheticSource) -> None:
    source.add_losses(lost_events=5, unattributed=2)
    source.exit_worker(source.pids[0])
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    doc = source.snapshot()
    m = parse_metrics(r.text)
    server = server_name(doc)
    assert server and all(s.labels["server"] == server for name, samples in m.items()
                          if name.startswith("accept_watch_") for s in samples)

    # Live workers one series each; every exited one summed into pid="exited" (bounded cardinality).
    accepts = {s.labels["pid"]: s.value for s in m["accept_watch_worker_accepts"]
               if s.name.endswith("_total")}
    # The idle master is not a worker: no series of its own.
    workers = [w for w in doc["workers"] if w["role"] == "worker"]
    live = {str(w["pid"]): w["accepts"] for w in workers if w["alive"]}
    gone = sum(w["accepts"] for w in workers if not w["alive"])
    assert gone > 0 and accepts == live | {"exited": gone}
    assert str(source.pids[0]) not in accepts
    assert sum(accepts.values()) == doc["total_accepts"]
    assert [s.value for s in m["accept_watch_accepts"] if s.name.endswith("_total")] == [doc["total_accepts"]]
    share = {s.labels["pid"]: s.value for s in m["accept_watch_worker_share_ratio"]}
    assert share == {str(w["pid"]): w["share"] for w in workers if w["alive"]}
    assert [s.value for s in m["accept_watch_live_workers"]] == [len(live)]
    assert [s.value for s in m["accept_watch_lost_events"]] == [5]
    assert m["accept_watch_lost_events"][0].name == "accept_watch_lost_events_total"
    unattributed = {s.labels["reason"]: s.value for s in m["accept_watch_unattributed_accepts"]}
    assert unattributed == {"fd_walk_failed": 2, "stats_map_full": 0}
    started = datetime.fromisoformat(doc["started_at"]).timestamp()
    assert [s.value for s in m["accept_watch_start_time_seconds"]] == [pytest.approx(started)]
    assert "accept_watch_duration_seconds" not in m

    def by_listener(name: str) -> dict[tuple[str, str], float]:
        return {(s.labels["port"], s.labels["inode"]): s.value for s in m[name]}

    assert by_listener("accept_watch_listen_queue_length") == {
        (str(li["port"]), str(li["inode"])): li["queue_depth"]["current"] for li in doc["listeners"]
    }
    assert by_listener("accept_watch_listen_queue_limit") == {
        (str(li["port"]), str(li["inode"])): li["queue_depth"]["limit"] for li in doc["listeners"]
    }


def test_metrics_queue_wait_histogram(client: TestClient, source: SyntheticSource) -> None:
    """One histogram per server over every worker: buckets are the workers' buckets summed."""
    doc = source.snapshot()
    m = parse_metrics(client.get("/metrics").text)
    samples = m["accept_watch_queue_wait_seconds"]
    hist = [entry for w in doc["workers"] for entry in w["queue_wait_hist"]]
    buckets = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    count = next(s.value for s in samples if s.name.endswith("_count"))
    total = sum(c for _, _, c in hist)
    assert total > 0 and count == total == sum(w["queue_wait_us"]["count"] for w in doc["workers"])
    assert buckets["+Inf"] == total
    for bound_ns in LE_BOUNDS_NS:
        # A sample is <= le exactly when its whole source bucket [low, high) lies at or below le.
        expected = sum(c for low, high, c in hist if high <= bound_ns + 1)
        assert buckets[repr(bound_ns / 1e9)] == expected, bound_ns
    total_s = next(s.value for s in samples if s.name.endswith("_sum"))
    assert total_s == pytest.approx(sum(w["queue_wait_us"]["mean"] * w["queue_wait_us"]["count"] / 1e6
                                        for w in doc["workers"] if w["queue_wait_us"]["count"]))
    # The bounds span the range the brief asks for: 10 µs to 10 s.
    assert LE_BOUNDS_NS[0] == 10_000 and LE_BOUNDS_NS[-1] == 10_000_000_000


# ---- security -------------------------------------------------------------------------------------


def test_token_required_everywhere_but_healthz(token_app: FastAPI) -> None:
    token_app.state.stopping.set()  # keeps /api/stream finite under TestClient
    paths = get_routes(token_app)
    assert {"/", "/api/snapshot", "/api/events", "/api/stream", "/metrics", "/healthz"} <= set(paths)
    assert "/openapi.json" in paths
    with TestClient(token_app) as c:
        for path in paths:
            if path == "/healthz":
                assert c.get(path).status_code == 200
                continue
            refused = c.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert c.get(path, params={"token": TOKEN[:-1]}).status_code == 401, path
            assert c.get(path, params={"token": "été"}).status_code == 401, path  # non-ASCII: no crash
            assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
            assert c.get(path, headers={"Authorization": f"bearer  {TOKEN}"}).status_code == 200, path
            assert c.get(path, params={"token": TOKEN}).status_code == 200, path


def test_bad_host_is_refused(client: TestClient, token_app: FastAPI) -> None:
    for path in ("/", "/api/snapshot", "/metrics", "/healthz"):
        assert client.get(path, headers={"Host": "evil.example"}).status_code == 400
        assert client.get(path, headers={"Host": "testserver.evil.example"}).status_code == 400
    with TestClient(token_app) as c:
        r = c.get("/api/snapshot", headers={"Host": "evil.example", "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400


def test_allowed_hosts_validation(source: SyntheticSource) -> None:
    with pytest.raises(ValueError, match="requires a token"):
        create_app(source, token=None, allowed_hosts={"*"})
    with pytest.raises(ValueError, match="at least one"):
        create_app(source, token=None, allowed_hosts=set())
    with pytest.raises(ValueError, match="token"):
        create_app(source, token="has space", allowed_hosts={HOST})
    app = create_app(source, token=TOKEN, allowed_hosts={"*"})
    with TestClient(app) as c:
        assert c.get("/healthz", headers={"Host": "anything.example:1234"}).status_code == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])
@pytest.mark.parametrize("path", ["/api/snapshot", "/", "/healthz", "/no/such/path"])
def test_only_read_methods(client: TestClient, method: str, path: str) -> None:
    r = client.request(method, path, content=b"{}")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"


def test_head_requests(client: TestClient) -> None:
    paths = ("/", "/api/snapshot", "/api/events", "/api/stream", "/metrics", "/healthz", "/static/app.js")
    for path in paths:
        r = client.head(path)
        assert r.status_code == 200, path
        assert r.content == b"", path


def test_no_cors_headers(client: TestClient) -> None:
    for r in (
        client.get("/api/snapshot", headers={"Origin": "http://evil.example"}),
        client.options(
            "/api/snapshot",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
        ),
    ):
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]


def test_oversized_requests_are_4xx(client: TestClient) -> None:
    assert client.get("/api/events", params={"limit": "1", "pad": "x" * 5000}).status_code == 414
    assert client.get("/" + "a" * 5000).status_code == 414
    assert client.get("/static/" + "a" * 200).status_code == 422  # asset names are short
    assert client.get("/api/snapshot", params={"download": "maybe"}).status_code == 422
    assert client.get("/healthz", headers={"X-Pad": "a" * 20_000}).status_code == 431


# ---- OpenAPI --------------------------------------------------------------------------------------


def test_openapi_documents_media_types(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {"/", "/static/{name}", "/metrics", "/healthz"} | {
        "/api/snapshot",
        "/api/events",
        "/api/stream",
    }
    for item in paths.values():
        assert set(item) == {"get"}  # read-only API
    ok = {p: item["get"]["responses"]["200"]["content"] for p, item in paths.items()}
    assert set(ok["/api/events"]) == {"application/x-ndjson"}
    assert set(ok["/api/stream"]) == {"text/event-stream"}
    assert set(ok["/metrics"]) == {"text/plain"}
    assert set(ok["/"]) == {"text/html"}
    assert ok["/api/snapshot"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Snapshot"}
    limit = next(p for p in paths["/api/events"]["get"]["parameters"] if p["name"] == "limit")
    bounds = limit["schema"]
    assert (bounds["minimum"], bounds["maximum"], bounds["default"]) == (1, 1000, 100)
    snapshot_props = set(schema["components"]["schemas"]["Snapshot"]["properties"])
    assert {"schema", "workers", "listeners", "rate_history", "lost_events", "unattributed"} <= snapshot_props


def test_openapi_declares_token_auth(token_app: FastAPI) -> None:
    with TestClient(token_app) as c:
        schema = c.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "queryToken"}
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert schema["paths"]["/api/snapshot"]["get"]["security"] == [{"bearer": []}, {"queryToken": []}]


# ---- schema-driven fuzzing (schemathesis) ---------------------------------------------------------

_fuzz_source = SyntheticSource(5, seed=11)
_fuzz_source.advance(30)
# A short stream interval so that schemathesis' read of the SSE stream (it stops after 20 events) is quick.
_fuzz_app = create_app(_fuzz_source, token=None, allowed_hosts={HOST}, stream_interval=0.01)
_fuzz_token_app = create_app(_fuzz_source, token=TOKEN, allowed_hosts={HOST}, stream_interval=0.01)
fuzz_schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app)
fuzz_token_schema = schemathesis.openapi.from_asgi(
    "/openapi.json", _fuzz_token_app, headers={"Authorization": f"Bearer {TOKEN}"}
)
FUZZ_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@fuzz_schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_no_server_error(case: schemathesis.Case) -> None:
    # All default checks: no 5xx, status codes, content types and bodies conform to the schema.
    case.call_and_validate()


@fuzz_token_schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_with_token(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})


# ---- the real server (uvicorn in a thread) --------------------------------------------------------


def raw_request(port: int, data: bytes) -> bytes:
    """Send raw bytes; return the response head (status line and headers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received and (chunk := s.recv(65536)):
            received += chunk
    return received


def test_server_serves_on_loopback(source: SyntheticSource) -> None:
    server = DashboardServer(source)
    assert server.token is None  # loopback: token optional
    server.start()
    try:
        port = server.port
        assert port > 0 and server.url == f"http://127.0.0.1:{port}/"
        r = httpx.get(server.url + "api/snapshot")
        assert r.status_code == 200 and r.json() == source.snapshot()
        for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
            assert httpx.get(server.url + "healthz", headers={"Host": host}).status_code == 200
        for host in (f"evil.example:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}", f"rebind.attacker:{port}"):
            assert httpx.get(server.url + "healthz", headers={"Host": host}).status_code == 400, host
        # Malformed and oversized requests get 4xx from the server itself, never a 500.
        assert raw_request(port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
        # Over the 16 KiB limit, yet small enough for the server to have read it all before it answers
        # and closes: unread bytes at close turn into a reset that can destroy the answer in flight.
        huge = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Pad: %s\r\n\r\n" % (port, b"a" * 20_000)
        assert raw_request(port, huge).startswith(b"HTTP/1.1 431")
        # Headers that never end: uvicorn (h11) gives up past its 16 KiB buffer limit.
        endless = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Pad: %s" % (port, b"a" * 20_000)
        assert raw_request(port, endless).startswith(b"HTTP/1.1 4")
        assert raw_request(port, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")  # no Host
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def test_server_with_token_prints_it_in_url(source: SyntheticSource) -> None:
    with DashboardServer(source, token=TOKEN) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/?token={TOKEN}"
        assert httpx.get(server.url).status_code == 200
        assert httpx.get(server.url.split("?")[0]).status_code == 401
        assert httpx.get(server.url.split("?")[0] + "healthz").status_code == 200


def test_non_loopback_listen_requires_a_token(source: SyntheticSource) -> None:
    exposed = DashboardServer(source, listen_host="0.0.0.0")  # not started: no need to really expose it
    assert exposed.token is not None and len(exposed.token) >= 24
    assert exposed.allowed_hosts(8080) == {"*"}
    assert DashboardServer(source, listen_host="192.0.2.7", token="mine-123").token == "mine-123"
    assert DashboardServer(source, listen_host="dashboard.example").token is not None
    for loopback in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        server = DashboardServer(source, listen_host=loopback)
        assert server.token is None, loopback
        assert server.allowed_hosts(9) == {"127.0.0.1:9", "localhost:9", "[::1]:9"}


def test_server_errors_are_one_line(source: SyntheticSource) -> None:
    with pytest.raises(DashboardError, match=r"0\.\.65535"):
        DashboardServer(source, port=70000)
    with DashboardServer(source) as first:
        clash = DashboardServer(source, port=first.port)
        with pytest.raises(DashboardError, match=rf"cannot listen on 127.0.0.1:{first.port}: ") as info:
            clash.start()
        assert "\n" not in str(info.value)
    with pytest.raises(DashboardError, match="cannot resolve"):
        DashboardServer(source, listen_host="no-such-host.invalid").start()


def read_sse_snapshots(response: httpx.Response, n: int) -> Iterator[tuple[float, dict]]:
    """Yield (arrival time, document) for the next n `snapshot` events of an open SSE response."""
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: ") and event == "snapshot":
            yield time.monotonic(), json.loads(line[len("data: ") :])
            n -= 1
            if n == 0:
                return


def test_stream_pushes_every_second_and_follows_source(source: SyntheticSource) -> None:
    with DashboardServer(source) as server, httpx.stream("GET", server.url + "api/stream", timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        arrivals = []
        for i, (arrived, doc) in enumerate(read_sse_snapshots(r, 4)):
            expected = source.snapshot()
            expected.pop("transitions")
            assert doc == expected
            arrivals.append(arrived)
            if i == 1:
                source.advance(2)  # the next push must show the new numbers
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert max(gaps) < 1.5, gaps  # at least once per second, with slack for a loaded machine


def test_stop_ends_open_streams_promptly(source: SyntheticSource) -> None:
    server = DashboardServer(source)
    server.start()
    opened = threading.Event()
    ended = threading.Event()

    def reader() -> None:
        with httpx.stream("GET", server.url + "api/stream", timeout=30) as r:
            opened.set()
            for _ in r.iter_lines():
                pass
        ended.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert opened.wait(5)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 4
    assert ended.wait(5)
