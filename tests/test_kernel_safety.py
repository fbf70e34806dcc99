"""Issue 11 with the real daemon: real probes counting a real server while files fail, the dashboard is
flooded, argv carries escape sequences, and the dashboard's address is taken.

Counts are checked against the servers' own per-pid records (tests/servers.py), never against
accept-watch itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests import servers
from tests.servers import _ACCEPT_LOOP, AcceptLoopServer, run_clients, spawn_port_reporter
from tests.watcher import ACCEPT_WATCH, run_cli, start_watch

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("kernel_ok")]

PAYLOAD = "\x1b]0;pwned\x07\x1b[2J"
ESCAPED = "\\x1b]0;pwned\\x07\\x1b[2J"
OUR_ESCAPES = re.compile(r"\x1b\[[0-9;]*[mHJ]")  # SGR styles, cursor home, clear: the live view's own


def _worker_counts(doc: dict) -> dict[int, int]:
    return {w["pid"]: w["accepts"] for w in doc["workers"] if w["accepts"]}


def _dashboard_base(stderr: str) -> str:
    match = re.search(r"dashboard at (http://[^/\s]+)/", stderr)
    assert match, stderr
    return match.group(1)


def _get(url: str, timeout: float = 5) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read(), time.monotonic() - t0


def _wait_for(what: str, check, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# -- escape sequences from a server's argv ----------------------------------------------------------


@contextlib.contextmanager
def _server_with_hostile_argv():
    workdir = Path(tempfile.mkdtemp(prefix="accept-watch-escape-"))
    (workdir / "records").mkdir()
    # The payload sits in the script's file name, near the start of argv (the live view cuts long lines).
    script = workdir / f"srv{PAYLOAD}.py"
    script.write_text(_ACCEPT_LOOP)
    argv = [sys.executable, str(script), "0", "0", str(workdir / "records"), "128"]
    proc, port = spawn_port_reporter(argv, workdir, 10.0, "escape server")
    with AcceptLoopServer(proc, port, workdir) as srv:
        yield srv


def test_escape_sequences_in_argv_never_reach_the_terminal(tmp_path: Path) -> None:
    with _server_with_hostile_argv() as srv:
        master, slave = pty.openpty()  # a real terminal: the live view redraws with ANSI
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 220, 0, 0))
        export = tmp_path / "run.json"
        log = tmp_path / "stderr"
        with open(log, "w") as err:
            proc = subprocess.Popen([*ACCEPT_WATCH, "--pid", str(srv.pid), "--no-dashboard",
                                     "--duration", "5", "--export", str(export)], stdout=slave, stderr=err,
                                    env={**os.environ, "COLUMNS": "220", "PYTHONUNBUFFERED": "1"})
        os.close(slave)
        out = b""
        _wait_for("attach", lambda: "attached in" in log.read_text() or proc.poll() is not None, 60)
        run_clients(srv.port, 5, concurrency=1)
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, "accept-watch wrote nothing for 30 s"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(30) == 0, log.read_text()
        os.close(master)
        text = out.decode("utf-8", "replace")
        assert ESCAPED in text  # the live view shows the argv, made visible
        bare = OUR_ESCAPES.sub("", text)
        assert "\x1b" not in bare and "\x07" not in bare, repr(bare[:400])
        assert _worker_counts(json.loads(export.read_text())) == srv.ground_truth() == {srv.pid: 5}
        report = run_cli("report", str(export))
        assert report.returncode == 0 and ESCAPED in report.stdout
        assert "\x1b" not in report.stdout and "\x07" not in report.stdout


# -- what the analysis says about a single-process server ----------------------------------------------


def test_single_process_server_is_not_an_analysis_failure(tmp_path: Path) -> None:
    with servers.start_single_accept_server(0) as srv:
        proc = run_cli("--pid", str(srv.pid), "--no-dashboard", "--duration", "2", "--quiet",
                       "--export", str(tmp_path / "run.json"))
        assert proc.returncode == 0, proc.stderr
        analysis = json.loads((tmp_path / "run.json").read_text())["analysis"]
        assert "error" not in analysis, analysis
        assert analysis["verdict"]["pattern"] == "not enough data"
        assert "no process has accepted a connection" in analysis["verdict"]["sentence"]
        assert "analysis failed" not in proc.stdout + proc.stderr


# -- the dashboard's address is checked before anything is attached -----------------------------------


def test_dashboard_address_is_checked_before_attaching(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with servers.start_single_accept_server(0) as srv:
            for listen in (f"127.0.0.1:{port}", "192.0.2.1:0"):  # in use; not an address of this host
                t0 = time.monotonic()
                proc = run_cli("--pid", str(srv.pid), "--listen", listen, "--duration", "5", "--quiet")
                assert proc.returncode == 1 and "Traceback" not in proc.stderr
                lines = proc.stderr.strip().splitlines()
                assert len(lines) == 1 and "cannot serve the dashboard" in lines[0], proc.stderr
                assert "attached" not in proc.stderr and "probe" not in proc.stderr  # nothing was loaded
                assert time.monotonic() - t0 < 5  # refused at once, not after a run
    finally:
        taken.close()


def test_access_denied_as_root_says_why(tmp_path: Path) -> None:
    """Root without CAP_SYS_PTRACE, a process of another user: "(run as root)" would be no help."""
    target = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"])
    try:
        time.sleep(0.3)
        proc = subprocess.run(["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace",
                               *ACCEPT_WATCH, "--pid", str(target.pid), "--no-dashboard"],
                              capture_output=True, text=True, timeout=60)
    finally:
        target.kill()
        target.wait()
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "access denied" in lines[0] and "(run as root)" not in lines[0]
    assert "although running as root" in lines[0] and "CAP_SYS_PTRACE" in lines[0]


# -- a failed export write does not end the run --------------------------------------------------------


@contextlib.contextmanager
def _small_tmpfs(where: Path, size: str = "1m"):
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(fs: Path) -> Path:
    filler = fs / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):  # ENOSPC: full
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def _start(pid: int, export: Path, stderr_path: Path, *extra: str) -> subprocess.Popen[str]:
    with open(stderr_path, "w") as err:
        return subprocess.Popen([*ACCEPT_WATCH, "--pid", str(pid), "--export", str(export), "--quiet",
                                 *extra], stdout=subprocess.DEVNULL, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_a_full_disk_is_reported_and_retried_while_counting_goes_on(tmp_path: Path) -> None:
    with _small_tmpfs(tmp_path / "small") as fs, servers.start_gunicorn(workers=2) as srv:
        export, log = fs / "run.json", tmp_path / "stderr"
        proc = _start(srv.master_pid, export, log, "--listen", "127.0.0.1:0")
        try:
            _wait_for("attach", lambda: "dashboard at" in log.read_text() or proc.poll() is not None, 60)
            base = _dashboard_base(log.read_text())
            run_clients(srv.port, 100, concurrency=2)
            filler = _fill(fs)
            _wait_for("a reported export failure", lambda: "warning: cannot write export" in log.read_text())
            assert proc.poll() is None, log.read_text()  # the run goes on
            run_clients(srv.port, 100, concurrency=2)

            def shown() -> bool:
                snap = json.loads(_get(base + "/api/snapshot")[1])
                return (snap.get("export_errors") or {}).get("count", 0) >= 1

            _wait_for("the failure in the dashboard's document", shown, 5)
            metrics = _get(base + "/metrics")[1].decode()
            failures = re.search(r'^accept_watch_export_failures_total\{server="[^"]+"\} (\S+)$', metrics,
                                 re.M)
            assert failures and float(failures.group(1)) >= 1, metrics
            filler.unlink()  # space again: the next periodic write succeeds and carries the record

            def recovered() -> bool:
                with contextlib.suppress(OSError, ValueError):
                    return json.loads(export.read_text()).get("export_errors", {}).get("count", 0) >= 1
                return False

            _wait_for("a good write after the failure", recovered, 15)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        doc = json.loads(export.read_text())
        errors = doc["export_errors"]
        assert errors["count"] >= 1 and errors["last_at"]
        assert "no space left on device" in errors["last_error"]
        assert _worker_counts(doc) == srv.ground_truth() and doc["total_accepts"] == 200


def test_a_final_write_that_keeps_failing_goes_to_a_named_fallback(tmp_path: Path) -> None:
    fallback: Path | None = None
    with _small_tmpfs(tmp_path / "small") as fs, servers.start_gunicorn(workers=2) as srv:
        export, log = fs / "run.json", tmp_path / "stderr"
        proc = _start(srv.master_pid, export, log, "--no-dashboard")
        try:
            _wait_for("attach", lambda: "attached in" in log.read_text() or proc.poll() is not None, 60)
            _fill(fs)
            run_clients(srv.port, 60, concurrency=2)
            _wait_for("a reported export failure", lambda: "warning: cannot write export" in log.read_text())
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log.read_text()
        match = re.search(r"error: cannot write export to \S+: no space left on device \(3 attempts\); "
                          r"the document was written to (\S+) instead$", text, re.M)
        assert match, text
        fallback = Path(match.group(1))
        try:
            doc = json.loads(fallback.read_text())
            assert oct(fallback.stat().st_mode & 0o777) == "0o600"
            assert _worker_counts(doc) == srv.ground_truth() and doc["total_accepts"] == 60
            assert doc["export_errors"]["count"] >= 4  # the periodic one(s) and the three final attempts
        finally:
            fallback.unlink()


# -- the dashboard under load: 200 slow clients and 200 streams while counting ---------------------------


class Flood:
    """200 half-open connections (a request head never finished, re-opened when the server drops them)
    and 200 Server-Sent Events clients, all from this one process, until stopped."""

    def __init__(self, port: int, n: int = 200) -> None:
        self.port, self.n = port, n
        self.stop = threading.Event()
        self.reopened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _half_open(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.sendall(b"GET /api/snapshot HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        s.setblocking(False)
        return s

    def _run(self) -> None:
        slow = [self._half_open() for _ in range(self.n)]
        streams = []
        for _ in range(self.n):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.sendall(f"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode())
            streams.append(s)
        try:
            while not self.stop.wait(0.2):
                for i, s in enumerate(slow):
                    try:
                        if s.recv(4096) == b"":
                            raise ConnectionResetError
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    s.close()
                    slow[i] = self._half_open()
                    self.reopened += 1
        finally:
            for s in slow + streams:
                s.close()


def test_dashboard_under_a_flood_still_answers_and_counts_stay_exact(tmp_path: Path) -> None:
    with servers.start_gunicorn(workers=2) as srv:
        run = start_watch(srv.master_pid, tmp_path, dashboard="127.0.0.1:0")
        base = _dashboard_base(run.stderr())
        port = int(base.rsplit(":", 1)[1])
        flood = Flood(port)
        clients: dict[str, object] = {}
        load = threading.Thread(target=lambda: clients.setdefault("r", run_clients(srv.port, 1500, 4)))
        worst: dict[str, float] = {"/healthz": 0.0, "/api/snapshot": 0.0}
        try:
            flood.thread.start()
            time.sleep(1.0)  # the flood is in place
            load.start()
            end = time.monotonic() + 14  # past the 10 s header deadline: re-opened slow clients too
            while time.monotonic() < end or load.is_alive():
                for path in worst:
                    status, _body, took = _get(base + path, timeout=5)
                    assert status == 200
                    worst[path] = max(worst[path], took)
                time.sleep(0.2)
            load.join()
        finally:
            flood.stop.set()
            flood.thread.join(10)
            rc = run.stop()
        assert rc == 0, run.stderr()
        print(f"worst latency under the flood: {worst}; slow clients dropped and re-opened: {flood.reopened}")
        assert all(t < 1.0 for t in worst.values()), worst
        assert flood.reopened >= 150, flood.reopened  # the server did drop the slow clients
        result = clients["r"]
        assert result.ok == 1500  # type: ignore[attr-defined]
        doc = run.document()
        assert _worker_counts(doc) == srv.ground_truth() and doc["total_accepts"] == 1500
        assert doc["lost_events"] == 0 and doc["unattributed"] == 0

