"""The real-server harness itself (no eBPF): if these fail, the kernel tests' ground truth is wrong.

Also covers the demo's load generator and launcher, which the harness shares.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from demo import gunicorn as launcher
from demo import run as demo
from demo.loadgen import LoadGenerator, resolve_loopback
from tests import servers


def _assert_exact_ground_truth(srv: servers.Server, result: servers.ClientResult, n: int) -> dict[int, int]:
    assert (result.ok, result.failed) == (n, 0), result.errors[:5]
    truth = srv.ground_truth()
    assert sum(truth.values()) == n
    # Each client connection shows up exactly once, under its own port, in the app's records.
    assert Counter(r.peer_port for r in srv.records()) == Counter(result.local_ports)
    return truth


def _assert_gone(pids: list[int]) -> None:
    alive = [pid for pid in pids if servers.pid_exists(pid)]
    assert not alive, f"processes left running after stop: {alive}"


@pytest.mark.parametrize("worker_class", ["sync", "uvicorn"])
def test_gunicorn_ground_truth_counts_every_connection(worker_class: str) -> None:
    with servers.start_gunicorn(workers=4, worker_class=worker_class) as srv:
        workers = srv.worker_pids()
        assert len(workers) == 4
        assert srv.ground_truth() == {}, "readiness must not make connections of its own"
        result = servers.run_clients(srv.port, 200, concurrency=4)
        truth = _assert_exact_ground_truth(srv, result, 200)
        assert set(truth) <= set(workers)
        assert all(psutil.Process(pid).ppid() == srv.master_pid for pid in truth)
        master = srv.master_pid
    _assert_gone([master, *workers])
    assert sum(srv.ground_truth().values()) == 200, "ground truth stays readable after the server stopped"


def test_max_requests_churn_keeps_ground_truth_exact() -> None:
    with servers.start_gunicorn(workers=4, worker_class="sync", max_requests=10) as srv:
        result = servers.run_clients(srv.port, 200, concurrency=4)
        truth = _assert_exact_ground_truth(srv, result, 200)
        booted = srv.booted_workers()
        current = srv.worker_pids()
        master = srv.master_pid
    assert len(truth) > 4, "workers should have been replaced after 10 requests each"
    assert max(truth.values()) <= 10
    assert set(truth) <= set(booted)
    assert all(booted[pid] == master for pid in truth), "every recording pid was a child of the master"
    _assert_gone([master, *current])


def test_ipv6_loopback_listener() -> None:
    with servers.start_gunicorn(workers=2, host="::1") as srv:
        result = servers.run_clients(srv.port, 20, concurrency=2, host="::1")
        _assert_exact_ground_truth(srv, result, 20)


def test_sleep_ms_slows_each_request() -> None:
    with servers.start_gunicorn(workers=1, sleep_ms=100) as srv:
        result = servers.run_clients(srv.port, 3, concurrency=1)
        _assert_exact_ground_truth(srv, result, 3)
    assert min(result.latencies) >= 0.09


def test_single_accept_server_holds_connections_in_the_queue() -> None:
    delay = 0.2
    with servers.start_single_accept_server(delay) as srv:
        result = servers.run_clients(srv.port, 3, concurrency=3)
        assert (result.ok, result.failed) == (3, 0), result.errors
        records = srv.records()
    assert [r.pid for r in records] == [srv.pid] * 3
    connected = {o.local_port: o.connected_ns for o in result.outcomes}
    waits = [(r.mono_ns - connected[r.peer_port]) / 1e9 for r in records]
    # All three connect at once; the server takes one per `delay`, so the k-th waits ~k * delay.
    for k, wait in enumerate(waits, start=1):
        assert k * delay - 0.06 <= wait <= k * delay + 0.15, waits


def test_blocked_acceptor_is_in_accept_before_any_client() -> None:
    with servers.start_blocked_acceptor() as srv:
        assert launcher.current_syscall(srv.pid) in launcher.accept_syscalls()
        assert srv.ground_truth() == {}
        result = servers.run_clients(srv.port, 1, concurrency=1)
        assert result.ok == 1, result.errors
        assert srv.ground_truth() == {srv.pid: 1}
        assert srv.records()[0].peer_port == result.local_ports[0]
        # A client that connects and leaves without a request is still accepted and recorded.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5):
            pass
        deadline = time.monotonic() + 5
        while srv.ground_truth() != {srv.pid: 2} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.ground_truth() == {srv.pid: 2}
        pid = srv.pid
    _assert_gone([pid])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_clients_counts_failures_without_retrying() -> None:
    result = servers.run_clients(_closed_port(), 7, concurrency=3)
    assert (result.ok, result.failed, len(result.outcomes)) == (0, 7, 7)
    assert all("ConnectionRefused" in e for e in result.errors)


def test_run_clients_refuses_a_non_loopback_target() -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        servers.run_clients(80, 1, host="192.0.2.1")


def test_pidapp_refuses_to_start_without_a_record_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PIDAPP_RECORD_DIR"}
    proc = subprocess.run([sys.executable, "-c", "import tests.apps.pidapp"], capture_output=True,
                          text=True, env=env, cwd=servers.REPO_ROOT, timeout=30)
    assert proc.returncode != 0
    assert "PIDAPP_RECORD_DIR is not set" in proc.stderr


def test_pidapp_wsgi_records_one_line_per_request(tmp_path: Path) -> None:
    code = (
        "from tests.apps import pidapp\n"
        "out = pidapp.app({'REMOTE_PORT': '4242'}, lambda status, headers: None)\n"
        "print(b''.join(out).decode().strip())\n"
    )
    env = {**os.environ, "PIDAPP_RECORD_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=servers.REPO_ROOT, timeout=30, check=True)
    pid = int(proc.stdout)
    (record,) = servers.read_records(tmp_path)
    assert (record.pid, record.peer_port) == (pid, 4242)


def test_read_records_rejects_garbage_but_waits_for_an_incomplete_line(tmp_path: Path) -> None:
    (tmp_path / "12.log").write_text("12 1000 5000\n12 2000 50")
    assert servers.read_records(tmp_path) == [servers.Record(12, 1000, 5000)]
    (tmp_path / "13.log").write_text("12 3000 5001\n")
    with pytest.raises(ValueError, match="in the file of pid 13"):
        servers.read_records(tmp_path)


# -- load generator ------------------------------------------------------------------------------


def test_loadgen_counts_match_the_server() -> None:
    with servers.start_gunicorn(workers=2) as srv:
        gen = LoadGenerator("127.0.0.1", srv.port, concurrency=4).start()
        time.sleep(1.0)
        stats = gen.stop()
        assert stats.failed == 0, stats.last_error
        assert stats.ok > 20
        assert sum(srv.ground_truth().values()) == stats.ok


def test_loadgen_rate_limit() -> None:
    with servers.start_gunicorn(workers=2) as srv:
        gen = LoadGenerator("127.0.0.1", srv.port, concurrency=2, rate_per_s=20).start()
        time.sleep(2.0)
        stats = gen.stop()
    assert stats.failed == 0, stats.last_error
    assert 32 <= stats.ok <= 44, stats  # 20/s for ~2 s


def test_loadgen_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="loopback"):
        LoadGenerator("192.0.2.1", 80, concurrency=1)
    with pytest.raises(ValueError, match="concurrency"):
        LoadGenerator("127.0.0.1", 80, concurrency=0)
    with pytest.raises(ValueError, match="rate_per_s"):
        LoadGenerator("127.0.0.1", 80, concurrency=1, rate_per_s=0)
    with pytest.raises(ValueError, match="out of range"):
        resolve_loopback("127.0.0.1", 70000)


def test_loadgen_stops_on_an_external_event() -> None:
    stop = threading.Event()
    gen = LoadGenerator("127.0.0.1", _closed_port(), concurrency=2, rate_per_s=50, stop_event=stop).start()
    time.sleep(0.3)
    stop.set()
    stats = gen.stop()
    assert stats.ok == 0 and stats.failed > 0  # nothing listens: every attempt is a counted failure


# -- demo ----------------------------------------------------------------------------------------


def test_demo_runs_load_against_gunicorn_and_cleans_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "out" / "demo.json"
    seen: dict[str, object] = {}

    def fake_watch(argv: list[str]) -> int:
        # Stands in for accept_watch.daemon.cli.main: what it would be handed, and what it would see.
        seen["argv"] = argv
        master = int(argv[argv.index("--pid") + 1])
        seen["master"] = master
        seen["workers"] = [p.pid for p in psutil.Process(master).children()]
        time.sleep(2.5)  # two 1-second phases
        Path(argv[argv.index("--export") + 1]).write_text("{}")
        return 0

    rc = demo.main(["--duration", "3", "--workers", "3", "--phase-seconds", "1", "--export", str(export),
                    "--", "--no-dashboard"], watch=fake_watch)
    out = capsys.readouterr()
    assert rc == 0, out.err
    argv = seen["argv"]
    assert isinstance(argv, list)
    assert argv[argv.index("--export") + 1] == str(export)
    assert argv[argv.index("--duration") + 1] == "3"
    assert argv[-1] == "--no-dashboard"
    assert len(seen["workers"]) == 3  # type: ignore[arg-type]
    assert f"JSON export: {export}" in out.out
    line = next(x for x in out.out.splitlines() if x.startswith("demo: load generator:"))
    ok, failed = int(line.split()[3]), int(line.split()[5])
    assert ok > 20 and failed == 0, line
    _assert_gone([seen["master"], *seen["workers"]])  # type: ignore[list-item]


def test_demo_stops_gunicorn_on_ctrl_c(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, list[int]] = {}

    def interrupted_watch(argv: list[str]) -> int:
        master = int(argv[argv.index("--pid") + 1])
        seen["pids"] = [master, *(p.pid for p in psutil.Process(master).children())]
        raise KeyboardInterrupt

    rc = demo.main(["--workers", "2", "--worker-class", "uvicorn", "--export", str(tmp_path / "d.json")],
                   watch=interrupted_watch)
    assert rc == 130
    assert len(seen["pids"]) == 3
    _assert_gone(seen["pids"])
    assert "no JSON export was written" in capsys.readouterr().err


def test_demo_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--workers", "0"], watch=lambda argv: 0) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
