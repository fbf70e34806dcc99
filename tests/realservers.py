"""Real third-party servers on 127.0.0.1 for the verdict tests, with the servers' OWN LOGS as ground truth.

Each launcher starts one server in its own temp dir and session (PR_SET_PDEATHSIG through
demo/pdeathsig.py, so a killed test run leaves nothing behind), waits until its workers sit idle
in a waiting syscall (no probe connection: that would be an accept of its own), and returns a LogServer:

    master_pid, ports, worker_pids(), helper_pids(), log_records() -> [groundtruth.LogRecord] by time

Here: nginx (Debian's binary, access log "$pid $msec $connection $server_port", keepalive off), Apache
prefork (log "%P %{usec}t %{local}p"), Python's socketserver.ForkingTCPServer (the parent accepts and
logs; a child per connection) and http.server.ThreadingHTTPServer (one process, a thread per connection).
gunicorn and uvicorn (whose ground truth is tests/apps/pidapp.py's per-pid records) are in
tests/realservers_py.py. Only processes started here are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from demo.gunicorn import current_syscall, log_tail, spawn_with_pdeathsig, waiting_syscalls
from tests.groundtruth import LogRecord
from tests.mpservers import session_members
from tests.servers import spawn_port_reporter
from tests.watcher import free_port

NGINX = "/usr/sbin/nginx"
APACHE = "/usr/sbin/apache2"
APACHE_MODULES = Path("/usr/lib/apache2/modules")


def children(pid: int) -> list[int]:
    try:
        return sorted(p.pid for p in psutil.Process(pid).children())
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def listening_ports(pid: int) -> set[int]:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return set()
    return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}


def wait_until(cond: Callable[[], bool], timeout_s: float, what: Callable[[], str]) -> None:
    """Poll until cond() holds on two polls in a row (50 ms apart); TimeoutError naming what failed."""
    deadline = time.monotonic() + timeout_s
    streak = 0
    while time.monotonic() < deadline:
        streak = streak + 1 if cond() else 0
        if streak >= 2:
            return
        time.sleep(0.05)
    raise TimeoutError(f"not ready after {timeout_s} s: {what()}")


def idle(pids: Sequence[int]) -> bool:
    """Every pid blocked in a waiting syscall (accept, poll/select, epoll)."""
    waiting = waiting_syscalls()
    return bool(pids) and all(current_syscall(p) in waiting for p in pids)


class LogServer:
    """A started server: its master, ports, workers and helpers, and its own log as records."""

    name = "server"

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, ports: list[int]) -> None:
        self.proc = proc
        self.workdir = workdir
        self.ports = ports
        self.log_path = workdir / "server.log"
        self._final: list[LogRecord] | None = None

    @property
    def master_pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return self.ports[0]

    def worker_pids(self) -> list[int]:
        """The processes that accept connections, now (the server's own view where it has one)."""
        return children(self.master_pid)

    def helper_pids(self) -> list[int]:
        """Processes of the server that are neither its master nor its accepting workers, now."""
        return []

    def log_records(self) -> list[LogRecord]:
        raise NotImplementedError

    def records(self) -> list[LogRecord]:
        return list(self._final) if self._final is not None else self.log_records()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the master, then SIGKILL whatever of its session is left. Idempotent."""
        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        deadline = time.monotonic() + timeout_s
        while (left := session_members(sid)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # our own session: only what this launcher started
            time.sleep(0.05)
        if session_members(sid):
            raise RuntimeError(f"{self.name} processes survived SIGKILL: {session_members(sid)}")

    def close(self) -> None:
        """stop(), keep the final log records in memory, remove the temp dir."""
        try:
            self.stop()
        finally:
            if self._final is None:
                with contextlib.suppress(OSError, ValueError):
                    self._final = self.log_records()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LogServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait_ready(self, workers: int, timeout_s: float, exclude: Sequence[int] = ()) -> list[int]:
        """Until `workers` new workers (none of `exclude`) are idle and every port listens."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up: {self.tail()}")
            pids = [p for p in self.worker_pids() if p not in exclude]
            return (len(pids) == workers and idle(pids)
                    and set(self.ports) <= listening_ports(self.master_pid))

        wait_until(ready, timeout_s, lambda: f"{self.name}: workers {self.worker_pids()}; {self.tail()}")
        return self.worker_pids()

    def tail(self) -> str:
        logs = [p for p in sorted(self.workdir.glob("*.log")) if "access" not in p.name]
        return " | ".join(log_tail(p, 5) for p in logs)


def _read_lines(path: Path) -> list[list[str]]:
    """Complete lines (a final line without its newline is still being written)."""
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().split("\n")[:-1] if line.strip()]


def _spawn(argv: list[str], workdir: Path, **kw: object) -> subprocess.Popen[bytes]:
    with open(workdir / "server.log", "ab") as log:
        return spawn_with_pdeathsig(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, **kw)


def _start_with_free_ports(
    make: Callable[[list[int]], LogServer], nports: int, workers: int, timeout_s: float
) -> LogServer:
    """Start a server on freshly picked free ports; a port taken in between (another test on this shared
    machine) fails the start: retry twice with new ports."""
    last: BaseException | None = None
    for _ in range(3):
        ports: list[int] = []
        while len(ports) < nports:
            p = free_port()
            if p not in ports:
                ports.append(p)
        server = make(ports)
        try:
            server._wait_ready(workers, timeout_s)
            return server
        except (RuntimeError, TimeoutError) as exc:
            last = exc
            server.close()
            if "in use" not in str(exc):
                raise
    raise RuntimeError(f"no free ports after 3 tries: {last}")


# -- nginx ------------------------------------------------------------------------------------------

_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;
events {{
    worker_connections 512;
    accept_mutex {accept_mutex};
}}
http {{
    log_format aw '$pid $msec $connection $server_port';
    access_log {dir}/access.log aw;
    keepalive_timeout 0;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    server {{
{listens}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


class LoggedWorkers(LogServer):
    """A server that logs the pid of each worker it starts: its workers are those still its master's
    children; the master's other children are helpers (nginx: a cache manager/loader; uvicorn:
    multiprocessing's resource_tracker)."""

    def logged_workers(self) -> list[int]:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        kids = set(children(self.master_pid))
        return [p for p in self.logged_workers() if p in kids]

    def helper_pids(self) -> list[int]:
        workers = set(self.logged_workers())
        return [p for p in children(self.master_pid) if p not in workers]


class Nginx(LoggedWorkers):
    name = "nginx"

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, ports: list[int], workers: int) -> None:
        super().__init__(proc, workdir, ports)
        self.workers = workers
        self.conf = workdir / "nginx.conf"

    def logged_workers(self) -> list[int]:
        """Every worker nginx says it started ("start worker process PID" in its error log, notice level)."""
        path = self.workdir / "error.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return sorted({int(m) for m in re.findall(r"start worker process (\d+)", text)})


    def log_records(self) -> list[LogRecord]:
        # $connection is nginx's connection serial (a counter in shared memory, so global across
        # workers): it orders connections within one configuration generation; $msec across them.
        rows = []
        for parts in _read_lines(self.workdir / "access.log"):
            if len(parts) != 4:
                raise ValueError(f"nginx access log: malformed line {parts!r}")
            pid, msec, serial, port = int(parts[0]), float(parts[1]), int(parts[2]), int(parts[3])
            rows.append(((msec, serial), LogRecord(pid, msec, port)))
        rows.sort(key=lambda row: row[0])
        return [r for _, r in rows]

    def reload(self, timeout_s: float = 20.0) -> list[int]:
        """`nginx -s reload`: new workers start, the old ones finish and exit. Returns the new workers
        once they are idle and the old ones are gone."""
        old = self.worker_pids()
        subprocess.run([NGINX, "-p", str(self.workdir), "-c", str(self.conf), "-e",
                        str(self.workdir / "error.log"), "-s", "reload"],
                       check=True, capture_output=True, timeout=10)

        def done() -> bool:
            pids = self.worker_pids()
            return not any(alive(p) for p in old) and len(pids) == self.workers and idle(pids)

        wait_until(done, timeout_s, lambda: f"nginx reload: workers {self.worker_pids()}, old {old}")
        return self.worker_pids()


def start_nginx(
    workers: int = 4, accept_mutex: bool = False, reuseport: bool = False, nports: int = 1,
    timeout_s: float = 20.0, hosts: Sequence[str] = (),
) -> Nginx:
    """Debian's nginx with its own config in a temp dir: `daemon off` (the process started is the
    master), `worker_processes N`, keepalive off (one request per connection, so one log line per
    accept). hosts: the address of each port's listener (default 127.0.0.1; "[::]" for IPv6)."""

    def make(ports: list[int]) -> LogServer:
        workdir = Path(tempfile.mkdtemp(prefix="accept-watch-nginx-"))
        (workdir / "tmp").mkdir()
        opt = " reuseport" if reuseport else ""
        where = list(hosts) + ["127.0.0.1"] * (len(ports) - len(hosts))
        listens = "\n".join(f"        listen {h}:{p}{opt};" for h, p in zip(where, ports, strict=True))
        conf = workdir / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(workers=workers, dir=workdir, listens=listens,
                                           accept_mutex="on" if accept_mutex else "off"))
        proc = _spawn([NGINX, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")], workdir)
        return Nginx(proc, workdir, ports, workers)

    return _start_with_free_ports(make, nports, workers, timeout_s)  # type: ignore[return-value]


# -- Apache prefork ---------------------------------------------------------------------------------

# Every Apache the tests run (prefork here, worker and event in realservers_apache.py) starts with
# this: one server root, the pid-logging access log, no keep-alive. The MPM and the log level vary.
APACHE_BASE_CONF = """\
ServerRoot "{dir}"
LoadModule mpm_{mpm}_module {mods}/mod_mpm_{mpm}.so
LoadModule authz_core_module {mods}/mod_authz_core.so
Listen 127.0.0.1:{port}
ServerName localhost
PidFile {dir}/apache.pid
DefaultRuntimeDir {dir}/run
ErrorLog {dir}/error.log
LogLevel {loglevel}
User www-data
Group www-data
DocumentRoot {dir}/htdocs
<Directory {dir}/htdocs>
    Require all granted
</Directory>
LogFormat "%P %{{usec}}t %{{local}}p" aw
CustomLog {dir}/access.log aw
KeepAlive Off
StartServers {workers}
"""
_APACHE_CONF = APACHE_BASE_CONF + """\
MinSpareServers {workers}
MaxSpareServers {workers}
ServerLimit {workers}
MaxRequestWorkers {workers}
MaxConnectionsPerChild 0
"""

APACHE_PATH = "/index.html"  # the file served (no mod_dir: "/" itself would not be 200)


def pid_time_port_records(path: Path, what: str, per_second: float) -> list[LogRecord]:
    """A log of "<pid> <time in 1/per_second s> <local port>" lines as records in time order; a
    malformed line is an error (a test must not pass on a log it misread)."""
    rows = []
    for parts in _read_lines(path):
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{what}: malformed line {parts!r}")
        rows.append(LogRecord(int(parts[0]), int(parts[1]) / per_second, int(parts[2])))
    rows.sort(key=lambda r: r.t)
    return rows


class Apache(LogServer):
    name = "apache2"

    def log_records(self) -> list[LogRecord]:
        return pid_time_port_records(self.workdir / "access.log", "apache access log", 1e6)


def start_apache(workers: int = 4, timeout_s: float = 20.0) -> Apache:
    """Debian's apache2 binary, prefork MPM only, our own minimal config, in the foreground."""

    def make(ports: list[int]) -> LogServer:
        workdir = Path(tempfile.mkdtemp(prefix="accept-watch-apache-"))
        workdir.chmod(0o755)  # children run as www-data and read htdocs
        (workdir / "run").mkdir()
        (workdir / "htdocs").mkdir()
        (workdir / "htdocs" / "index.html").write_text("ok\n")
        conf = workdir / "apache2.conf"
        conf.write_text(_APACHE_CONF.format(dir=workdir, mods=APACHE_MODULES, port=ports[0], workers=workers,
                                            mpm="prefork", loglevel="warn"))
        proc = _spawn([APACHE, "-f", str(conf), "-D", "FOREGROUND"], workdir)
        return Apache(proc, workdir, ports)

    return _start_with_free_ports(make, 1, workers, timeout_s)  # type: ignore[return-value]


# -- socketserver.ForkingTCPServer and http.server.ThreadingHTTPServer -----------------------------

# argv: kind log_path. Prints its port once listening. One log line per connection, written by the
# process that accepted it, at accept: "<accepting pid> <monotonic_ns> <local port> <child pid or 0>".
_PY_SERVER = r'''
import http.server, os, socketserver, sys, time
kind, log_path = sys.argv[1], sys.argv[2]
fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
BODY = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"

def record(local_port, child):
    os.write(fd, f"{os.getpid()} {time.monotonic_ns()} {local_port} {child}\n".encode())

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        self.wfile.write(BODY)

class Forking(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    request_queue_size = 128
    def process_request(self, request, client_address):
        before = set(self.active_children or ())
        super().process_request(request, client_address)  # forks; the parent closes its copy
        (child,) = set(self.active_children) - before
        record(self.server_address[1], child)

class Threading(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    request_queue_size = 128
    def process_request(self, request, client_address):
        record(self.server_address[1], 0)
        super().process_request(request, client_address)

class HTTPHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *args):
        pass

srv = Forking(("127.0.0.1", 0), Handler) if kind == "forking" else Threading(("127.0.0.1", 0), HTTPHandler)
sys.stdout.write(f"{srv.server_address[1]}\n")
sys.stdout.flush()
os.close(1)
srv.serve_forever()
'''


class PyServer(LogServer):
    """ForkingTCPServer (kind "forking") or ThreadingHTTPServer (kind "threading")."""

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, ports: list[int], kind: str) -> None:
        super().__init__(proc, workdir, ports)
        self.kind = kind
        self.name = kind

    def worker_pids(self) -> list[int]:
        return [self.master_pid]  # the one process that accepts

    def helper_pids(self) -> list[int]:
        return children(self.master_pid)  # forking: the per-connection children still running

    def child_pids(self) -> set[int]:
        """Every per-connection child ever forked (from the log)."""
        return {r.child for r in self.records() if r.child}

    def log_records(self) -> list[LogRecord]:
        rows = []
        for parts in _read_lines(self.workdir / "access.log"):
            if len(parts) != 4 or not all(p.isdigit() for p in parts):
                raise ValueError(f"{self.kind} log: malformed line {parts!r}")
            pid, ns, port, child = map(int, parts)
            rows.append(LogRecord(pid, ns / 1e9, port, child or None))
        rows.sort(key=lambda r: r.t)
        return rows


def start_py_server(kind: str, timeout_s: float = 15.0) -> PyServer:
    if kind not in ("forking", "threading"):
        raise ValueError(f"unknown python server kind {kind!r}")
    workdir = Path(tempfile.mkdtemp(prefix=f"accept-watch-{kind}-"))
    argv = [sys.executable, "-c", _PY_SERVER, kind, str(workdir / "access.log")]
    try:
        proc, port = spawn_port_reporter(argv, workdir, timeout_s, f"{kind} server")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = PyServer(proc, workdir, [port], kind)
    try:
        server._wait_ready(1, timeout_s)
    except BaseException:
        server.close()
        raise
    return server


__all__ = ["APACHE_PATH", "Apache", "LogServer", "Nginx", "PyServer", "start_apache", "start_nginx",
           "start_py_server"]
