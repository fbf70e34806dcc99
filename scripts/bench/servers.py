"""The benchmark's servers: Debian's nginx (2 workers) and gunicorn (sync workers, the demo app).

Each keeps a per-request access log holding the pid of the worker that served the request, which is
the ground truth accept-watch's per-worker counts are compared with. A measurement window is
delimited by log offsets (nothing else talks to these servers), so one server serves many runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENV_BIN = REPO / ".venv" / "bin"


class ServerError(Exception):
    """A server did not start, answer or stop as expected (one line)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? (netlink via ss: no connection, no accept)."""
    out = subprocess.run(
        ["ss", "-Htln", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return bool(out.strip())


def open_connections(port: int) -> int:
    """Server-side TCP connections on `port` that are not closed yet (TIME_WAIT and the listener
    excluded): established, in the accept queue, or closing."""
    out = subprocess.run(
        ["ss", "-Htna", "exclude", "time-wait", "exclude", "listening", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(1 for line in out.splitlines() if line.strip())


@dataclass
class Window:
    """Where a measurement window starts: access-log offset and (nginx) stub_status accepts."""

    log_offset: int
    accepts: int | None = None
    status_calls: int = 0


@dataclass
class WindowCounts:
    log_by_pid: dict[int, int]
    log_lines: int
    # nginx only: connections nginx accepted on the TCP port in the window (stub_status "accepts",
    # minus our own stub_status queries); None when the server has no such counter.
    server_accepts: int | None
    # stub_status queries answered while the window was open (they are unix-socket accepts of the
    # workers: a one-liner that counts every accept4() sees them too).
    status_calls: int = 0
    problems: list[str] = field(default_factory=list)


class Server:
    name = "server"
    connections_hint = 0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "access.log"

    @property
    def master_pid(self) -> int:
        if self.proc is None:
            raise ServerError(f"{self.name} is not running")
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def worker_pids(self) -> list[int]:
        return sorted(c.pid for c in psutil.Process(self.master_pid).children(recursive=True))

    def pids(self) -> set[int]:
        return {self.master_pid, *self.worker_pids()}

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerError(f"{self.name} exited with status {self.proc.returncode}: {self._tail()}")

    def _tail(self) -> str:
        out = self.workdir / "server.out"
        text = out.read_text(errors="replace").strip().splitlines() if out.exists() else []
        return " | ".join(text[-3:]) or "(no output)"

    def _wait_ready(self, workers: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if len(self.worker_pids()) >= workers and _listening(self.port):
                # Workers fork, then set themselves up; give them time to reach their accept loop.
                time.sleep(1.0)
                self._check_alive()
                return
            time.sleep(0.1)
        raise ServerError(
            f"{self.name} did not start {workers} workers listening on {self.port} "
            f"within {timeout:.0f} s: {self._tail()}"
        )

    def begin(self) -> Window:
        return Window(self.log_offset())

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def _read_log(self, start: int, end: int) -> Counter[int]:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        if data and not data.endswith(b"\n"):
            raise ServerError(f"{self.log_path}: window ends inside a line (a request still running)")
        counts: Counter[int] = Counter()
        for line in data.decode().splitlines():
            counts[self.parse_pid(line)] += 1
        return counts

    def parse_pid(self, line: str) -> int:
        raise NotImplementedError

    def drain(self, timeout: float = 15.0) -> float:
        """Wait until every connection of the load is closed (all its requests logged).

        Returns seconds waited."""
        started = time.monotonic()
        while open_connections(self.port) > 0:
            if time.monotonic() - started > timeout:
                raise ServerError(
                    f"{self.name}: connections still open {timeout:.0f} s after the load stopped"
                )
            time.sleep(0.05)
        return time.monotonic() - started

    def end(self, window: Window) -> WindowCounts:
        counts = self._read_log(window.log_offset, self.log_offset())
        return WindowCounts(dict(sorted(counts.items())), sum(counts.values()), None)

    def stop(self) -> None:
        if self.proc is None:
            return
        workers = []
        with contextlib.suppress(psutil.Error):
            workers = self.worker_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        # Workers of a master that was killed outright would linger: end them by pid.
        for pid in workers:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        self.proc = None

    stop_signal = signal.SIGTERM


def _die_with_bench(argv: list[str]) -> list[str]:
    """argv run through demo/pdeathsig.py: the server gets SIGTERM if the benchmark dies (no orphans)."""
    return [sys.executable, str(REPO / "demo" / "pdeathsig.py"), str(os.getpid()), *argv]


class Nginx(Server):
    name = "nginx"

    def __init__(self, workdir: Path, accept_mutex: str = "off") -> None:
        super().__init__(workdir)
        self.accept_mutex = accept_mutex
        self.status_sock = workdir / "status.sock"
        self.status_calls = 0
        self.conf = workdir / "nginx.conf"

    def start(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(binary):
            raise ServerError("nginx not found (Debian's nginx-light; scripts/setup.sh installs it)")
        template = (HERE / "nginx.conf.in").read_text()
        text = (
            template.replace("@DIR@", str(self.workdir))
            .replace("@PORT@", str(self.port))
            .replace("@ACCEPT_MUTEX@", self.accept_mutex)
        )
        self.conf.write_text(text)
        # nginx's workers run as "nobody" and create their temp directories under the prefix.
        os.chmod(self.workdir, 0o755)
        out = open(self.workdir / "server.out", "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            _die_with_bench([binary, "-c", str(self.conf), "-p", str(self.workdir), "-g", "daemon off;"]),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(workers=2)
        # Self-check of the accounting below: two status queries in a row differ by exactly one
        # accept (the second query), i.e. no TCP accept happened and none of ours is miscounted.
        first = self.status()
        second = self.status()
        if second["accepts"] - first["accepts"] != 1:
            raise ServerError(
                f"nginx stub_status accepts went {first['accepts']} -> {second['accepts']} "
                "between two queries with no load (expected +1)"
            )

    stop_signal = signal.SIGQUIT  # graceful: finish requests, flush logs

    def status(self) -> dict[str, int]:
        """nginx's stub_status over its unix socket (each call is itself one accepted connection)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.status_sock))
            s.sendall(b"GET / HTTP/1.0\r\nHost: status\r\n\r\n")
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
        self.status_calls += 1
        body = b"".join(chunks).decode().split("\r\n\r\n", 1)[-1]
        lines = body.splitlines()
        # Active connections: N / server accepts handled requests / A H R / Reading..
        active = int(lines[0].split(":")[1])
        accepts, handled, requests = (int(x) for x in lines[2].split())
        return {"active": active, "accepts": accepts, "handled": handled, "requests": requests}

    def parse_pid(self, line: str) -> int:
        pid, _conn, _status = line.split()
        return int(pid)

    def begin(self) -> Window:
        st = self.status()
        return Window(self.log_offset(), st["accepts"], self.status_calls)

    def drain(self, timeout: float = 15.0) -> float:
        """Until nginx holds no connection but our status query (stub_status "Active")."""
        started = time.monotonic()
        while self.status()["active"] > 1:
            if time.monotonic() - started > timeout:
                raise ServerError(f"nginx: connections still active {timeout:.0f} s after the load stopped")
            time.sleep(0.05)
        return time.monotonic() - started

    def end(self, window: Window) -> WindowCounts:
        st = self.status()
        counts = self._read_log(window.log_offset, self.log_offset())
        if window.accepts is None:
            raise ServerError("nginx window without a stub_status reading")
        queries = self.status_calls - window.status_calls  # our queries after begin(), this one included
        tcp_accepts = st["accepts"] - window.accepts - queries
        return WindowCounts(
            dict(sorted(counts.items())), sum(counts.values()), tcp_accepts, status_calls=queries + 1
        )


class Gunicorn(Server):
    """Not demo.gunicorn.GunicornProcess: the benchmark counts requests from gunicorn's access log in
    windows (the Server interface it shares with nginx), and its start-up must match the earlier runs
    its figures are compared with."""

    name = "gunicorn"

    def __init__(self, workdir: Path, workers: int = 8) -> None:
        super().__init__(workdir)
        self.workers = workers

    def start(self) -> None:
        binary = VENV_BIN / "gunicorn"
        if not binary.exists():
            raise ServerError(f"{binary} not found (scripts/setup.sh installs the test dependencies)")
        env = dict(os.environ, ACCEPT_WATCH_DEMO_SLEEP_MS="0")  # the tiny app, answering at once
        out = open(self.workdir / "server.out", "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            _die_with_bench([
                str(binary),
                "-w",
                str(self.workers),
                "-k",
                "sync",
                "-b",
                f"127.0.0.1:{self.port}",
                "--access-logfile",
                str(self.log_path),
                "--access-logformat",
                "%(p)s",
                "--log-level",
                "warning",
                "--pythonpath",  # the demo's app is in the repository, not the installed package
                str(REPO),
                "demo.app:app",
            ]),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
        )
        self._wait_ready(workers=self.workers)

    def parse_pid(self, line: str) -> int:
        # gunicorn's %(p)s atom is "<pid>"
        text = line.strip()
        if not (text.startswith("<") and text.endswith(">")):
            raise ServerError(f"unexpected gunicorn access log line {line!r}")
        return int(text[1:-1])


def python_version() -> str:
    return sys.version.split()[0]
