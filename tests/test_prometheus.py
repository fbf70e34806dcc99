"""The shipped Prometheus alert rules and Grafana dashboard against real tools: promtool checks and
unit-tests the rules, and a real `prometheus` (Debian's) scrapes a real accept-watch watching a real
gunicorn, then every Grafana panel's PromQL runs against its HTTP API and must return the series the
panel draws."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from accept_watch.daemon import discovery
from demo.loadgen import LoadGenerator
from tests import servers
from tests.watcher import free_port, start_watch

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "accept-watch.json"
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval would be at a 1 s scrape interval, with margin

# Labels every series of a panel must carry (beyond job/instance), by panel title. A new panel needs
# an entry here, so it is checked too.
PANEL_LABELS: dict[str, set[str]] = {
    "Accepts per second by worker": {"server", "pid"},
    "Share of accepts vs fair share": {"server", "pid"},
    "Load vs fair share (1 = fair)": {"server", "port", "pid"},
    "Distribution verdict": {"server", "port", "pattern", "confidence", "cause"},
    "Accept-queue wait p50 / p99": {"server"},
    "Accept queue length and limit": {"server", "address", "port", "inode"},
    "Listen drops per second": {"server", "address", "port"},
    "accept-watch losses": {"server"},
    "Live workers": {"server"},
    "accept-watch CPU and memory": {"instance"},
}

needs_prometheus = pytest.mark.skipif(
    not (shutil.which("promtool") and shutil.which("prometheus")),
    reason="Debian's prometheus (promtool) is not installed (make setup)")


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@needs_prometheus
def test_rules_check_and_fire_on_recorded_series() -> None:
    checked = _promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout
    tested = _promtool("test", "rules", "alerts_test.yml", cwd=RULES.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


@needs_prometheus
def test_rules_test_can_fail(tmp_path: Path) -> None:
    """The unit test is not vacuous: expecting the fair worker to be flagged fails."""
    shutil.copy(RULES, tmp_path / "alerts.yml")
    text = (RULES.parent / "alerts_test.yml").read_text()
    (tmp_path / "alerts_test.yml").write_text(text.replace('pid: "101"', 'pid: "102"'))
    tested = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert tested.returncode != 0 and "FAILED" in tested.stdout + tested.stderr


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _query(base: str, expr: str) -> list[dict]:
    body = json.loads(_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def panel_queries() -> Iterator[tuple[str, str]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$server", ".*").replace("$__rate_interval", RATE_INTERVAL)
            assert "$" not in expr, expr  # a Grafana variable this test does not know how to fill
            yield panel["title"], expr


def test_every_panel_is_checked() -> None:
    titles = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert sorted(titles) == sorted(PANEL_LABELS) and len(titles) == len(set(titles))


def _start_prometheus(tmp: Path, target: str) -> tuple[subprocess.Popen[bytes], str]:
    shutil.copy(RULES, tmp / "alerts.yml")
    (tmp / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "accept-watch", "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_text = (tmp / "prometheus.log").read_text()
            raise AssertionError(f"prometheus exited {proc.returncode}: {log_text}")
        try:
            _get(base + "/-/ready")
            return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("prometheus did not become ready in 20 s")


def _panel_results(base: str) -> Iterator[tuple[str, str, list[dict]]]:
    """Each Grafana panel's query against the real Prometheus: (title, expression, result), once checked
    that it returns series and each carries the labels the panel uses."""
    for title, expr in panel_queries():
        result = _query(base, expr)
        assert result, (title, expr)
        for series in result:
            assert PANEL_LABELS[title] <= set(series["metric"]), (title, expr, series["metric"])
        yield title, expr, result


def _stop_prometheus(prom: subprocess.Popen[bytes]) -> None:
    prom.send_signal(signal.SIGTERM)
    try:
        prom.wait(10)
    except subprocess.TimeoutExpired:
        prom.kill()
        prom.wait()


def _assert_promtool_accepts(scrape: str) -> None:
    """promtool's own check of a /metrics text: no error and no lint warning."""
    checked = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel_ok")
@needs_prometheus
def test_grafana_panels_against_a_real_prometheus(tmp_path: Path) -> None:
    started = time.monotonic()
    web = free_port()
    with servers.start_gunicorn(workers=3) as srv:
        run = start_watch(srv.master_pid, tmp_path, dashboard=f"127.0.0.1:{web}")
        prom: subprocess.Popen[bytes] | None = None
        load = LoadGenerator("127.0.0.1", srv.port, concurrency=3, rate_per_s=150).start()
        try:
            scrape = _get(f"http://127.0.0.1:{web}/metrics")
            _assert_promtool_accepts(scrape)
            prom, base = _start_prometheus(tmp_path, f"127.0.0.1:{web}")
            # Enough scrapes for rate() over RATE_INTERVAL, and a verdict (it needs some accepts).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if (_query(base, "count_over_time(accept_watch_accepts_total[1m]) >= 6")
                        and _query(base, "accept_watch_verdict_info")):
                    break
                time.sleep(0.5)
            server = f"gunicorn:{srv.port}"
            workers = {str(p) for p in srv.worker_pids()}
            for title, _expr, result in _panel_results(base):
                for series in result:
                    labels = series["metric"]
                    if "server" in PANEL_LABELS[title]:
                        assert labels["server"] == server, (title, labels)
                    if "pid" in PANEL_LABELS[title]:
                        assert labels["pid"] in workers | {"exited"}, (title, labels, workers)
                if title == "Accepts per second by worker":
                    assert {s["metric"]["pid"] for s in result} == workers | {"exited"}
                    assert sum(float(s["value"][1]) for s in result) > 0
                if title == "Listen drops per second":
                    assert {s["metric"]["port"] for s in result} == {str(srv.port)}
            # The rules load and evaluate in a real Prometheus (a type error would show as "err").
            groups = json.loads(_get(base + "/api/v1/rules"))["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert len(rules) == 7 and all(r["health"] == "ok" for r in rules), rules
        finally:
            load.stop()
            if prom is not None:
                _stop_prometheus(prom)
            assert run.stop() == 0, run.stderr()
    assert time.monotonic() - started < 60


def _metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel_ok")
def test_listen_drops_of_a_real_server_reach_metrics(tmp_path: Path) -> None:
    """gunicorn with listen(1) and one worker busy 3 s per request; 20 clients at once: the kernel
    drops every SYN the full queue cannot take, and /metrics shows the listener's sk_drops."""
    n = 20
    web = free_port()
    with servers.start_gunicorn(workers=1, sleep_ms=3000, extra_args=["--backlog", "1"]) as srv:
        run = start_watch(srv.master_pid, tmp_path, dashboard=f"127.0.0.1:{web}")
        clients = []
        try:
            deadline = time.monotonic() + 5
            before = None
            while before is None and time.monotonic() < deadline:  # until the first counter read
                before = _metric(_get(f"http://127.0.0.1:{web}/metrics"), "accept_watch_listen_drops_total",
                                 port=str(srv.port))
                time.sleep(0.1)
            assert before == 0
            for _ in range(n):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", srv.port))
                clients.append(c)
            deadline = time.monotonic() + 10
            drops = 0.0
            while time.monotonic() < deadline:
                drops = _metric(_get(f"http://127.0.0.1:{web}/metrics"), "accept_watch_listen_drops_total",
                                port=str(srv.port)) or 0.0
                if drops >= n - 3:  # the queue holds 2, the worker took at most 1
                    break
                time.sleep(0.2)
            out = subprocess.run(["ss", "-Hltnem", "-4", f"sport = :{srv.port}"], capture_output=True,
                                 text=True, check=True).stdout
            limit = _metric(_get(f"http://127.0.0.1:{web}/metrics"), "accept_watch_listen_queue_limit",
                            port=str(srv.port))
        finally:
            for c in clients:
                c.close()
            assert run.stop() == 0, run.stderr()
    (row,) = discovery.parse_ss_listeners(out, "ipv4")
    assert n - 3 <= drops <= (row.drops or 0), (drops, out)  # ss read later: retransmits may add more
    assert limit in (None, 1)  # listen(1) as the kernel applies it (null until the first accept is seen)


# Panels whose series belong to one watched server (a `server` label); the rest are accept-watch's own.
RATED = "rate(accept_watch_accepts_total[10s]) > 0 and count_over_time(accept_watch_accepts_total[1m]) >= 6"
SERVE_PER_SERVER = {title for title, labels in PANEL_LABELS.items() if "server" in labels}


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel_ok")
@needs_prometheus
def test_grafana_panels_against_serve_watching_gunicorn_and_nginx(tmp_path: Path) -> None:
    """`accept-watch serve` watching a real gunicorn and a real nginx, gunicorn restarted on the way (a
    new master on the same pid file and port): a real Prometheus scrapes it, and every panel's query
    returns series for both `server` values."""
    from tests.servewatch import start_nginx_at, start_serve

    web, gport, nport = free_port(), free_port(), free_port()
    pidfile = tmp_path / "gunicorn.pid"
    g = servers.start_gunicorn(workers=3, port=gport, extra_args=["--pid", str(pidfile)])
    n = start_nginx_at(nport, workers=2)
    run = start_serve(tmp_path, "--pidfile", f"web={pidfile}", "--port", f"nginx={nport}",
                      "--resolve-every", "1", web=web)
    prom: subprocess.Popen[bytes] | None = None
    loads = [LoadGenerator("127.0.0.1", p, concurrency=2, rate_per_s=100).start() for p in (gport, nport)]
    try:
        prom, base = _start_prometheus(tmp_path, f"127.0.0.1:{web}")
        time.sleep(3)
        loads[0].stop()
        g.close()  # restart: the same target, a new generation
        g = servers.start_gunicorn(workers=3, port=gport, extra_args=["--pid", str(pidfile)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and run.targets()["web"]["generation"] != 2:
            time.sleep(0.2)
        assert run.targets()["web"]["generation"] == 2, run.stderr()
        loads[0] = LoadGenerator("127.0.0.1", gport, concurrency=2, rate_per_s=100).start()
        both = {"web", "nginx"}
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            verdicts = {s["metric"]["server"] for s in _query(base, "accept_watch_verdict_info")}
            rates = {s["metric"]["server"] for s in _query(base, RATED)}
            if verdicts == both and rates == both:
                break
            time.sleep(0.5)
        scrape = run.get("/metrics")
        _assert_promtool_accepts(scrape)
        workers = {str(p) for p in g.worker_pids()} | {str(p) for p in n.worker_pids()} | {"exited"}
        for title, expr, result in _panel_results(base):
            for series in result:
                labels = series["metric"]
                if "pid" in PANEL_LABELS[title] and "rate" not in expr:
                    assert labels["pid"] in workers, (title, labels, workers)
            if title in SERVE_PER_SERVER:
                assert {s["metric"]["server"] for s in result} == both, (title, expr, result)
        # Through the restart: the old master's workers went, the counts carried on.
        assert float(_query(base, 'accept_watch_masters{server="web"}')[0]["value"][1]) == 2
        assert len(_query(base, "accept_watch_target_up == 1")) == 2
    finally:
        for load in loads:
            with contextlib.suppress(RuntimeError):
                load.stop()
        if prom is not None:
            _stop_prometheus(prom)
        code = run.stop()
        g.close()
        n.close()
    assert code == 0, run.stderr()
