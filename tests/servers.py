"""Real servers and real clients for the tests: gunicorn/uvicorn workers, plain sockets, no mocks.

Ground truth comes from the servers themselves: every accepted connection is recorded by the
process that accepted it (tests/apps/pidapp.py, or the accept-loop script below) as one line
"<pid> <monotonic_ns> <peer port>" in <record_dir>/<pid>.log. Readiness is established without
connecting (a probe connection would be an accept of its own): workers present, listener in
/proc/net/tcp*, every worker idle in a waiting syscall and past gunicorn's post_worker_init.

    with start_gunicorn(workers=4) as srv:
        result = run_clients(srv.port, 200, concurrency=4)
        assert sum(srv.ground_truth().values()) == result.ok
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from demo.gunicorn import (
    GunicornProcess,
    accept_syscalls,
    current_syscall,
    log_tail,
    spawn_with_pdeathsig,
)
from demo.loadgen import RequestOutcome, request_once, resolve_loopback

REPO_ROOT = Path(__file__).resolve().parent.parent
PIDAPP_WSGI = "tests.apps.pidapp:app"
PIDAPP_ASGI = "tests.apps.pidapp:asgi_app"


# -- ground-truth records ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One accepted connection, as its server recorded it."""

    pid: int
    mono_ns: int  # time.monotonic_ns() when the server handled it
    peer_port: int  # the client's port


def read_records(record_dir: Path) -> list[Record]:
    """Every complete line of every <pid>.log, sorted by time.

    A line is written with one O_APPEND write(), so only a write racing with this read can show up as
    a final line without its newline; it is not complete yet and is left for the next read. Anything
    else malformed raises.
    """
    records: list[Record] = []
    for path in sorted(record_dir.glob("*.log")):
        text = path.read_text()
        lines = text.split("\n")
        for i, line in enumerate(lines[:-1]):  # lines[-1] is "" or an incomplete in-flight line
            parts = line.split()
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise ValueError(f"{path}:{i + 1}: malformed ground-truth line {line!r}")
            pid, ns, port = map(int, parts)
            if str(pid) != path.stem:
                raise ValueError(f"{path}:{i + 1}: line of pid {pid} in the file of pid {path.stem}")
            records.append(Record(pid, ns, port))
    records.sort(key=lambda r: r.mono_ns)
    return records


def count_by_pid(records: Sequence[Record]) -> dict[int, int]:
    return dict(sorted(Counter(r.pid for r in records).items()))


# -- gunicorn --------------------------------------------------------------------------------------

_READY_HOOK = """\
import os

READY_DIR = {ready_dir!r}


def post_worker_init(worker):
    # Runs in the worker once the app is loaded, right before its accept loop: the worker's
    # readiness marker, and a record of its parent (worker pids churn under --max-requests).
    path = os.path.join(READY_DIR, str(os.getpid()))
    with open(path + ".tmp", "w") as f:
        f.write(f"{{os.getpid()}} {{os.getppid()}}\\n")
    os.replace(path + ".tmp", path)
"""


class RecordingServer:
    """A server process tree writing per-pid records (one line per accepted connection, the ground
    truth) under record_dir. Subclasses set workdir, record_dir and _final_records, define stop(),
    and may extend what close() keeps (_keep_final) and how it cleans up (_remove_files)."""

    workdir: Path
    record_dir: Path
    _final_records: list[Record] | None

    def stop(self) -> None:
        raise NotImplementedError

    def records(self) -> list[Record]:
        if self._final_records is not None:
            return list(self._final_records)
        return read_records(self.record_dir)

    def ground_truth(self) -> dict[int, int]:
        return count_by_pid(self.records())

    def close(self) -> None:
        """stop(), keep the final records in memory, remove the files."""
        try:
            self.stop()
        finally:
            if self._final_records is None and self.record_dir.exists():
                self._keep_final()
            self._remove_files()

    def _keep_final(self) -> None:
        self._final_records = read_records(self.record_dir)

    def _remove_files(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RecordingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Server(RecordingServer):
    """A running gunicorn serving the pid app. Context manager: leaving it stops gunicorn."""

    def __init__(self, gunicorn: GunicornProcess, record_dir: Path, ready_dir: Path) -> None:
        self._gunicorn = gunicorn
        self.record_dir = record_dir
        self.ready_dir = ready_dir
        self._final_records: list[Record] | None = None
        self._final_booted: dict[int, int] | None = None

    @property
    def master_pid(self) -> int:
        return self._gunicorn.master_pid

    @property
    def port(self) -> int:
        return self._gunicorn.port

    @property
    def host(self) -> str:
        return self._gunicorn.host

    @property
    def log_path(self) -> Path:
        return self._gunicorn.log_path

    def worker_pids(self) -> list[int]:
        """The master's current children."""
        return self._gunicorn.worker_pids()

    def booted_workers(self) -> dict[int, int]:
        """Every worker that ever finished booting: pid -> parent pid (from post_worker_init)."""
        if self._final_booted is not None:
            return dict(self._final_booted)
        booted: dict[int, int] = {}
        for path in self.ready_dir.iterdir():
            if path.name.endswith(".tmp"):
                continue
            pid, ppid = map(int, path.read_text().split())
            booted[pid] = ppid
        return dict(sorted(booted.items()))

    def stop(self) -> None:
        """SIGTERM the master, SIGKILL after a timeout, and leave no orphaned worker. Idempotent."""
        self._gunicorn.stop()

    def _keep_final(self) -> None:
        super()._keep_final()
        self._final_booted = self.booted_workers()

    def _remove_files(self) -> None:
        self._gunicorn.close()


def start_gunicorn(
    workers: int = 8,
    worker_class: str = "sync",
    max_requests: int = 0,
    port: int = 0,
    extra_args: Sequence[str] = (),
    sleep_ms: float = 0,
    reuse_port: bool = False,
    host: str = "127.0.0.1",
    ready_timeout_s: float = 30.0,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Start gunicorn with the pid app (`worker_class` "sync", or "uvicorn" for UvicornWorker with the
    ASGI app) and return once every worker is ready. port=0: the kernel picks a free port, read back
    from the listening socket (no bind-then-release race)."""
    if sleep_ms < 0:
        raise ValueError(f"sleep_ms must be >= 0, got {sleep_ms}")
    gunicorn = GunicornProcess(
        PIDAPP_ASGI if worker_class == "uvicorn" else PIDAPP_WSGI,
        workers=workers, worker_class=worker_class, host=host, port=port, max_requests=max_requests,
        reuse_port=reuse_port, extra_args=extra_args, pythonpath=str(REPO_ROOT),
    )
    try:
        record_dir = gunicorn.workdir / "records"
        ready_dir = gunicorn.workdir / "ready"
        record_dir.mkdir()
        ready_dir.mkdir()
        gunicorn.config_text = _READY_HOOK.format(ready_dir=str(ready_dir))
        gunicorn.env.update({"PIDAPP_RECORD_DIR": str(record_dir), "PIDAPP_SLEEP_MS": str(sleep_ms),
                             **(extra_env or {})})
        gunicorn.start()

        def all_booted(pids: list[int]) -> bool:
            return all((ready_dir / str(pid)).exists() for pid in pids)

        gunicorn.wait_ready(ready_timeout_s, extra_check=all_booted)
    except BaseException:
        gunicorn.close()
        raise
    return Server(gunicorn, record_dir, ready_dir)


# -- clients ---------------------------------------------------------------------------------------


@dataclass
class ClientResult:
    ok: int
    failed: int
    latencies: list[float]  # seconds, connect() to response EOF, of the successful connections
    outcomes: list[RequestOutcome] = field(default_factory=list)  # every connection, in completion order

    @property
    def errors(self) -> list[str]:
        return [o.error for o in self.outcomes if o.error]

    @property
    def local_ports(self) -> list[int]:
        """Client ports of the successful connections (= the servers' recorded peer ports)."""
        return [o.local_port for o in self.outcomes if o.ok and o.local_port is not None]


def run_clients(
    port: int,
    n: int,
    concurrency: int = 2,
    host: str = "127.0.0.1",
    path: str = "/",
    timeout_s: float = 5.0,
    deadline_s: float = 120.0,
) -> ClientResult:
    """Open exactly n TCP connections, one HTTP/1.0 request each (Connection: close), at most
    `concurrency` at a time. Failures are counted, never retried. Raises TimeoutError if the overall
    deadline passes before all n connections were made (no silently short run)."""
    if n < 0 or concurrency < 1:
        raise ValueError(f"need n >= 0 and concurrency >= 1, got n={n}, concurrency={concurrency}")
    family, sockaddr = resolve_loopback(host, port)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 literal in brackets
    deadline = time.monotonic() + deadline_s
    lock = threading.Lock()
    issued = 0
    outcomes: list[RequestOutcome] = []

    def client() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued >= n or time.monotonic() >= deadline:
                    return
                issued += 1
            outcome = request_once(family, sockaddr, path, timeout_s, authority)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(concurrency, max(n, 1)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + timeout_s + 1.0)
    with lock:
        done = list(outcomes)
        started = issued
    if any(t.is_alive() for t in threads) or len(done) != n:
        raise TimeoutError(
            f"run_clients: {len(done)} of {n} connections finished ({started} started) within {deadline_s} s"
        )
    ok = [o for o in done if o.ok]
    return ClientResult(len(ok), n - len(ok), [o.latency_s for o in ok], done)


# -- single-process accept loop -------------------------------------------------------------------

# argv: sleep_before_accept_s, port, record_dir, backlog. Prints its port once listening.
# Per connection: sleep, accept, record, send a fixed HTTP response right away (without waiting for
# a request: a client may only read), then half-close and drain until the client closes, so that
# unread request bytes never turn the close into a reset.
_ACCEPT_LOOP = r"""
import os, socket, sys, time
sleep_s, port, record_dir, backlog = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
pid = os.getpid()
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(backlog)
fd = os.open(os.path.join(record_dir, f"{pid}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
body = f"{pid}\n".encode()
response = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
sys.stdout.write(f"{srv.getsockname()[1]}\n")
sys.stdout.flush()
os.close(1)
while True:
    if sleep_s:
        time.sleep(sleep_s)
    conn, addr = srv.accept()
    os.write(fd, f"{pid} {time.monotonic_ns()} {addr[1]}\n".encode())
    try:
        conn.settimeout(2.0)
        conn.sendall(response)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    except OSError:
        pass
    finally:
        conn.close()
"""


class AcceptLoopServer(RecordingServer):
    """One real process (python) that sleeps, accept()s, records, answers, closes; in a loop."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.workdir = workdir
        self.record_dir = workdir / "records"
        self.log_path = workdir / "server.log"
        self._final_records: list[Record] | None = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)



def _start_accept_loop(
    sleep_before_accept_s: float, port: int, backlog: int, timeout_s: float
) -> AcceptLoopServer:
    if sleep_before_accept_s < 0:
        raise ValueError(f"sleep_before_accept_s must be >= 0, got {sleep_before_accept_s}")
    workdir = Path(tempfile.mkdtemp(prefix="accept-watch-acceptloop-"))
    (workdir / "records").mkdir()
    argv = [sys.executable, "-c", _ACCEPT_LOOP, repr(sleep_before_accept_s), str(port),
            str(workdir / "records"), str(backlog)]
    try:
        proc, bound = spawn_port_reporter(argv, workdir, timeout_s, "accept-loop server")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return AcceptLoopServer(proc, bound, workdir)


def spawn_port_reporter(
    argv: list[str], workdir: Path, timeout_s: float, what: str
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a test server (own session, PR_SET_PDEATHSIG) that prints its port as its first line of
    stdout, stderr going to workdir/server.log. If it does not, kill its whole process group and
    raise RuntimeError with the log's tail."""
    with open(workdir / "server.log", "wb") as log:
        proc = spawn_with_pdeathsig(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                    start_new_session=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline().decode().strip() if ready else ""
        proc.stdout.close()
        if not line.isdigit():
            raise RuntimeError(f"{what} did not start: {log_tail(workdir / 'server.log')}")
        return proc, int(line)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group is the server's tree
        proc.wait(5.0)
        raise


def start_single_accept_server(
    sleep_before_accept_s: float, port: int = 0, backlog: int = 128, timeout_s: float = 10.0
) -> AcceptLoopServer:
    """One process looping: sleep X, accept(), record, answer, close. Clients that connect at once
    wait about X in the accept queue (each connection, if they come one at a time)."""
    return _start_accept_loop(sleep_before_accept_s, port, backlog, timeout_s)


def start_blocked_acceptor(port: int = 0, timeout_s: float = 10.0) -> AcceptLoopServer:
    """A process already blocked inside accept() when this returns (checked in /proc/PID/syscall):
    for attaching probes to an accept that started before them."""
    server = _start_accept_loop(0.0, port, 128, timeout_s)
    try:
        accept_nrs = accept_syscalls()
        deadline = time.monotonic() + timeout_s
        while current_syscall(server.pid) not in accept_nrs:
            if server.proc.poll() is not None:
                raise RuntimeError(f"blocked acceptor exited: {log_tail(server.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {server.pid} not blocked in accept() after {timeout_s} s")
            time.sleep(0.01)
    except BaseException:
        server.close()
        raise
    return server


def pid_exists(pid: int) -> bool:
    """True if `pid` is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


__all__ = [
    "PIDAPP_ASGI",
    "PIDAPP_WSGI",
    "AcceptLoopServer",
    "ClientResult",
    "Record",
    "Server",
    "count_by_pid",
    "pid_exists",
    "read_records",
    "run_clients",
    "start_blocked_acceptor",
    "start_gunicorn",
    "start_single_accept_server",
]
