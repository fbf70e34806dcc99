"""Real servers in shapes the steady-state table does not cover: a php-fpm dynamic pool growing under
load, Apache's graceful stop under load, one nginx with two listeners (IPv4 and IPv6), a gunicorn bound to
a unix socket only, and `--pid` given what is not a server (init, a kernel thread, a zombie, a plain
process). Ground truth is each server's own log; counts first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import groundtruth as gt
from tests import verdicts as v
from tests.realservers import APACHE_PATH, alive, children, start_nginx, wait_until
from tests.realservers_apache import start_apache_threaded
from tests.realservers_fpm import php_fpm_binary, start_php_fpm
from tests.servers import REPO_ROOT
from tests.watcher import run_cli, start_watch

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("kernel_ok")]

N = 4


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.skipif(php_fpm_binary() is None, reason="php-fpm not installed (scripts/setup.sh installs it)")
def test_php_fpm_dynamic_pool_grows(tmp_path: Path) -> None:
    """pm = dynamic, 2 children at start, up to 4: under 8 clients and 20 ms requests php-fpm forks more.
    The children forked mid-run are workers (they accepted), counted exactly, owed only while live."""
    srv = start_php_fpm(N, "dynamic", start=2, sleep_ms=20)
    first = srv.worker_pids()
    assert len(first) == 2
    state: dict[str, list[int]] = {}

    def action() -> None:
        v.load(srv.http_port, 300, 8)
        state["final"] = srv.worker_pids()

    doc, _ = v.watch_during(srv, tmp_path, action)
    records = srv.records()
    v.assert_counts_exact(doc, records, 300)
    grown = set(gt.per_pid(records)) - set(first)
    assert grown, f"the premise: php-fpm forked more children under load: {gt.per_pid(records)}"
    v.assert_roles(doc, sorted(gt.per_pid(records)))
    r = v.roles(doc)
    assert r[srv.master_pid] == "master", r
    verdict = v.verdict(doc)
    assert verdict["cause"] == "fifo-wakeup", verdict  # children block in accept() (seen in /proc)
    # Every child seen waiting, the new ones included, waits in accept() on the pool's socket (a child
    # born under load may be caught busy in every sample: "unknown", never another mode).
    modes = {int(p): m["mode"] for p, m in doc["analysis"]["wait_modes"]["by_pid"].items()}
    seen = {modes[p] for p in gt.per_pid(records) if p in modes} - {"unknown"}
    assert seen == {"blocking-accept"}, modes
    lw = v.fairness(doc)["live_workers"]
    assert lw["min"] >= 2 and lw["max"] <= N, lw
    v.assert_verdict_matches_log(doc, records, srv.port,
                                 known=gt.from_membership(first, state.get("final", [])))


def test_apache_graceful_stop_under_load(tmp_path: Path) -> None:
    """SIGWINCH (apachectl -k graceful-stop) while clients connect: the master and its children finish
    and exit; accept-watch counts every connection they took, marks them exited and ends its run."""
    srv = start_apache_threaded("event", N, threads=2)
    workers = srv.worker_pids()
    watch = start_watch(srv.master_pid, tmp_path, "--grace", "1")
    try:
        v.load(srv.port, 150, 2, APACHE_PATH)
        bg = v.Background(srv.port, 40, 1, APACHE_PATH)
        time.sleep(0.1)
        srv.graceful_stop()
        bg._thread.join(30)  # connections after the stop are refused: not counted by anyone
        watch.proc.wait(30)  # the master is gone and nothing holds its socket: the run ends itself
    finally:
        code = watch.stop()
        srv.close()
    assert code == 0, watch.stderr()
    assert "exited" in watch.stderr(), watch.stderr()
    doc = watch.document()
    records = srv.records()
    v.assert_counts_exact(doc, records)
    assert len(records) >= 150
    v.assert_roles(doc, workers)
    v.assert_exited_not_alive(doc, [*workers, srv.master_pid])


def test_two_listeners_ipv4_and_ipv6(tmp_path: Path) -> None:
    """One nginx on 127.0.0.1:A and [::]:B: both ports counted and judged on their own; the IPv6 one has
    family ipv6; per-port accepts equal the log's."""
    srv = start_nginx(N, nports=2, hosts=["127.0.0.1", "[::]"])
    v4, v6 = srv.ports
    workers = srv.worker_pids()

    def action() -> None:
        v.load(v4, 150, 1)
        load6 = v.run_clients(v6, 120, concurrency=1, host="::1")
        assert load6.failed == 0, load6.errors[:3]

    doc, _ = v.watch_during(srv, tmp_path, action)
    records = srv.records()
    assert gt.per_port(records) == {v4: 150, v6: 120}
    v.assert_counts_exact(doc, records, 270)
    by_port = {lst["port"]: lst for lst in doc["listeners"]}
    assert by_port[v4]["family"] == "ipv4" and by_port[v6]["family"] == "ipv6", doc["listeners"]
    assert by_port[v4]["accepts"] == 150 and by_port[v6]["accepts"] == 120, doc["listeners"]
    assert set(doc["analysis"]["per_port"]) == {str(v4), str(v6)}
    for port, n in ((v4, 150), (v6, 120)):
        per = v.verdict(doc, port)
        assert per["figures"]["accepts"] == n, per
    v.assert_roles(doc, workers)
    v.assert_fairness_population(doc, N)


def test_unix_socket_only_gunicorn_says_nothing_to_count(tmp_path: Path) -> None:
    """gunicorn bound to a unix socket only: one line naming the unix socket, non-zero exit."""
    sock = tmp_path / "g.sock"
    env = {**os.environ, "PIDAPP_RECORD_DIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    with open(tmp_path / "gunicorn.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"unix:{sock}", "--workers", "2",
                                 "tests.apps.pidapp:app"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        wait_until(lambda: sock.exists() and len(children(proc.pid)) == 2, 30,
                   lambda: (tmp_path / "gunicorn.log").read_text()[-500:])
        line = _one_line_error(run_cli("--pid", str(proc.pid), "--no-dashboard", "--duration", "2"),
                               "no listening TCP socket", "unix socket", "nothing to count")
        assert str(proc.pid) in line
    finally:
        proc.terminate()
        proc.wait(20)


def test_pid_that_is_not_a_server() -> None:
    """init, a kernel thread, a zombie, a process with no listener: one clear line each, non-zero exit."""
    _one_line_error(run_cli("--pid", "1", "--no-dashboard"), "pid 1 is the init process")
    kthreads = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_kthread(int(p))]
    assert kthreads, "the premise: this machine has kernel threads"
    kt = next(p for p in kthreads if p != 2) if len(kthreads) > 1 else kthreads[0]
    _one_line_error(run_cli("--pid", str(kt), "--no-dashboard"), f"pid {kt} is a kernel thread")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until(lambda: not alive(zombie.pid), 10, lambda: "child did not exit")
    try:
        _one_line_error(run_cli("--pid", str(zombie.pid), "--no-dashboard"), f"pid {zombie.pid}", "zombie")
    finally:
        zombie.wait()
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _one_line_error(run_cli("--pid", str(plain.pid), "--no-dashboard"), "no listening TCP socket")
    finally:
        plain.kill()
        plain.wait()


def _is_kthread(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return bool(int(raw[raw.rfind(b")") + 2:].split()[6]) & 0x00200000)
