"""Issue 10's CLI cases on real servers: `--pid` given a worker, `--pidfile` across a full restart (new
master, new socket), `--port` on a two-port nginx. Ground truth is each server's own log; counts first.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from tests import groundtruth as gt
from tests import verdicts as v
from tests.realservers import start_nginx
from tests.realservers_py import start_gunicorn_server
from tests.watcher import WatchRun, start_watch

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("kernel_ok")]

N = 4


def test_pid_of_a_worker_watches_its_master(tmp_path: Path) -> None:
    srv = start_gunicorn_server(N)
    master, worker = srv.master_pid, srv.worker_pids()[0]
    workers = srv.worker_pids()
    doc, run = v.watch_during(srv, tmp_path, lambda: v.load(srv.port, 200, 4), pid=worker)
    records = srv.records()
    v.assert_counts_exact(doc, records, 200)
    # One line on stderr names the master the worker belongs to.
    naming = [line for line in run.stderr().splitlines() if str(master) in line and str(worker) in line]
    assert len(naming) == 1, run.stderr()
    assert doc["master_pid"] == master
    assert v.listener_modes(doc, srv.port) == {"shared"}, doc["listeners"]
    v.assert_roles(doc, workers)
    assert "no other worker holds the socket" not in v.verdict(doc)["sentence"]


def test_pidfile_follows_a_full_restart(tmp_path: Path) -> None:
    pidfile = tmp_path / "gunicorn.pid"
    first = start_gunicorn_server(N, pidfile=pidfile)
    second = watch = None
    try:
        watch = start_watch(None, tmp_path, "--pidfile", str(pidfile))
        v.load(first.port, 150, 4)
        old_master = first.master_pid
        first.close()  # graceful stop; gunicorn removes its pidfile
        second = start_gunicorn_server(N, pidfile=pidfile)  # a new master, a new listening socket
        assert second.master_pid != old_master
        _wait_export_master(watch, second.master_pid)
        v.load(second.port, 150, 4)
        still_watching = watch.proc.poll() is None
    finally:
        code = watch.stop() if watch is not None else None
        first.close()
        if second is not None:
            second.close()
    assert code == 0, watch.stderr()
    assert still_watching, f"accept-watch stopped at the restart: {watch.stderr()}"
    doc = watch.document()
    assert second is not None
    records = first.records() + second.records()
    v.assert_counts_exact(doc, records, 300)
    new_listeners = [lst for lst in doc["listeners"] if lst["port"] == second.port]
    assert new_listeners, doc["listeners"]
    assert doc["master_pid"] == second.master_pid


def _wait_export_master(watch: WatchRun, master: int, timeout_s: float = 20.0) -> None:
    """Until accept-watch's periodic export names `master` (what a user sees once the restart was picked
    up); connections made before that moment cannot be asked of it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if watch.document().get("master_pid") == master:
                return
        if watch.proc.poll() is not None:
            raise AssertionError(f"accept-watch exited at the restart: {watch.stderr()}")
        time.sleep(0.1)
    raise AssertionError(f"accept-watch did not pick up the new master {master} in {timeout_s} s: "
                         f"{watch.stderr()}")


def test_port_selects_one_of_two(tmp_path: Path) -> None:
    srv = start_nginx(N, nports=2)
    watched, other = srv.ports
    workers = srv.worker_pids()

    def action() -> None:
        v.load(watched, 160, 1)
        v.load(other, 80, 1)

    doc, _ = v.watch_during(srv, tmp_path, action, "--port", str(watched))
    records = srv.records()
    assert gt.per_port(records) == {watched: 160, other: 80}
    # Only the chosen port is counted and judged.
    v.assert_counts_exact(doc, gt.on_port(records, watched), 160)
    verdict = v.verdict(doc)
    assert "busiest of" not in verdict["sentence"], verdict["sentence"]
    assert list(doc["analysis"]["per_port"]) == [str(watched)]
    assert doc["diagnostics"]["wait_unknown"] == 0, doc["diagnostics"]
    v.assert_verdict_matches_log(doc, records, watched, sequence_exact=True, known=gt.always(workers))
