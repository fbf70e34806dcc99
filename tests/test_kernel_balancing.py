"""Issue 4 on real servers and the real kernel: the verdict, the wait mode, the listener mode and
in-worker queueing that accept-watch reports for each balancing set-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import servers
from tests.balancing_servers import start_balancing_server
from tests.watcher import start_watch

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("kernel_ok")]


def _watch(pid: int, port: int, tmp_path: Path, n: int, concurrency: int) -> dict:
    run = start_watch(pid, tmp_path)
    try:
        result = servers.run_clients(port, n, concurrency=concurrency)
        assert result.failed == 0, result.errors()[:3]
    finally:
        assert run.stop() == 0, run.stderr()
    doc = run.document()
    assert doc["total_accepts"] == n and doc["unattributed"] == 0
    return doc


def _worker_modes(doc: dict, pids: list[int]) -> set[str]:
    by_pid = doc["analysis"]["wait_modes"]["by_pid"]
    return {by_pid[str(p)]["mode"] for p in pids}


def test_blocking_accept_under_saturation_is_round_robin(tmp_path: Path) -> None:
    with start_balancing_server("accept", workers=4, work_ms=5) as srv:
        doc = _watch(srv.pid, srv.port, tmp_path, n=400, concurrency=12)
        assert _worker_modes(doc, srv.worker_pids()) == {"blocking-accept"}, doc["analysis"]["wait_modes"]
    verdict = doc["analysis"]["verdict"]
    assert verdict["pattern"] == "round-robin", verdict["sentence"]
    assert doc["listeners"][0]["mode"] == "shared"


def test_epoll_waiters_at_low_load_concentrate(tmp_path: Path) -> None:
    with start_balancing_server("epoll", workers=4) as srv:
        doc = _watch(srv.pid, srv.port, tmp_path, n=200, concurrency=1)
        assert _worker_modes(doc, srv.worker_pids()) == {"epoll"}
    verdict = doc["analysis"]["verdict"]
    # At low load one worker may take every connection: the extreme of concentration.
    assert verdict["pattern"] in ("concentrated", "single-acceptor"), verdict["sentence"]


def test_epoll_exclusive_is_detected_and_concentrates(tmp_path: Path) -> None:
    with start_balancing_server("epoll-exclusive", workers=4) as srv:
        doc = _watch(srv.pid, srv.port, tmp_path, n=200, concurrency=1)
        assert _worker_modes(doc, srv.worker_pids()) == {"epoll-exclusive"}
    verdict = doc["analysis"]["verdict"]
    # At low load one worker may take every connection: the extreme of concentration.
    assert verdict["pattern"] in ("concentrated", "single-acceptor"), verdict["sentence"]
    assert "EPOLLEXCLUSIVE" in verdict["sentence"]


def test_reuseport_group_is_detected_and_hash_spread(tmp_path: Path) -> None:
    with start_balancing_server("reuseport", workers=4) as srv:
        doc = _watch(srv.pid, srv.port, tmp_path, n=400, concurrency=1)
    modes = {lst["mode"] for lst in doc["listeners"]}
    assert modes == {"reuseport"} and len(doc["listeners"]) == 4
    verdict = doc["analysis"]["verdict"]
    assert verdict["pattern"] in ("random", "even"), verdict["sentence"]
    assert "SO_REUSEPORT" in verdict["sentence"]


@pytest.mark.parametrize(("worker_class", "mode"), [("sync", "poll/select"), ("uvicorn", "epoll")])
def test_gunicorn_wait_modes(tmp_path: Path, worker_class: str, mode: str) -> None:
    with servers.start_gunicorn(workers=2, worker_class=worker_class) as srv:
        doc = _watch(srv.master_pid, srv.port, tmp_path, n=40, concurrency=2)
        assert _worker_modes(doc, srv.worker_pids()) == {mode}
    assert doc["analysis"]["wait_modes"]["dominant"] == mode


def test_asyncio_worker_accepting_while_busy_is_flagged(tmp_path: Path) -> None:
    with start_balancing_server("asyncio", workers=1, work_ms=300) as srv:
        doc = _watch(srv.pid, srv.port, tmp_path, n=24, concurrency=8)
    (worker,) = [w for w in doc["workers"] if w["accepts"]]
    assert worker["pid"] == srv.pid
    assert worker["inflight"]["max"] >= 4, worker["inflight"]
    assert worker["inflight"]["busy_accepts"] > 0
    assert worker["inflight"]["closed"] == 24 and worker["inflight"]["now"] == 0
    assert worker["inflight"]["life_ms"]["mean"] >= 250
    codes = {f["code"] for f in doc["analysis"]["flags"]}
    assert "inflight_queueing" in codes, doc["analysis"]["flags"]


def test_report_reproduces_the_live_verdict(tmp_path: Path) -> None:
    with start_balancing_server("epoll", workers=4) as srv:
        _watch(srv.pid, srv.port, tmp_path, n=200, concurrency=1)
    live = (tmp_path / "export.json")
    proc = subprocess.run([sys.executable, "-m", "accept_watch.daemon.cli", "report", str(live), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import json

    stored = json.loads(live.read_text())["analysis"]["verdict"]
    assert json.loads(proc.stdout)["verdict"]["sentence"] == stored["sentence"]
    assert "differs" not in proc.stderr
