"""A real gunicorn master and its workers for the demo, the tests and the benchmark: GunicornProcess
(the one gunicorn launcher), plus the process helpers the other launchers share (the syscall a worker
waits in, log tails; spawn_with_pdeathsig is demo/pdeathsig.py's)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from accept_watch.daemon import procwait

from .pdeathsig import spawn_with_pdeathsig

WORKER_CLASSES: dict[str, str] = {
    "sync": "sync",
    # uvicorn (0.54 here) still ships its gunicorn worker; it warns that the separate uvicorn-worker
    # package is the future home. The class is the same either way.
    "uvicorn": "uvicorn.workers.UvicornWorker",
}

def current_syscall(pid: int) -> int | None:
    """The syscall number `pid` is blocked in (from /proc/PID/syscall), None if running or unknown."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            state = procwait.parse_syscall(f.read())
    except (OSError, ValueError):
        return None
    return state.nr if state.nr is not None and state.nr >= 0 else None


def waiting_syscalls() -> dict[int, str]:
    """Syscalls an idle worker sits in when it is ready for connections: the sync worker select()s on
    the listener, the uvicorn worker epoll_wait()s, a plain blocking server is in accept()/accept4()."""
    return {nr: name for nr, name in _table().items() if name in procwait.WAITING_SYSCALL_NAMES}


def accept_syscalls() -> frozenset[int]:
    return frozenset(nr for nr, name in _table().items() if name in procwait.ACCEPT_SYSCALL_NAMES)


def _table() -> dict[int, str]:
    try:
        return procwait.syscall_table()
    except NotImplementedError as exc:
        raise RuntimeError(str(exc)) from None


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class GunicornProcess:
    """A real gunicorn master and its workers, in their own session (Ctrl-C in the terminal reaches
    only us; we stop gunicorn ourselves).

    A private work directory holds gunicorn's log and config file (`config_text`, python; an explicit
    -c also keeps gunicorn from picking up a ./gunicorn.conf.py from wherever we were started).
    Use as a context manager, or call start(), wait_ready() and stop().
    """

    def __init__(
        self,
        app: str,
        *,
        workers: int,
        worker_class: str = "sync",
        host: str = "127.0.0.1",
        port: int = 0,
        max_requests: int = 0,
        reuse_port: bool = False,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        pythonpath: str | None = None,
        config_text: str = "",
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if worker_class not in WORKER_CLASSES:
            raise ValueError(f"worker class must be one of {', '.join(WORKER_CLASSES)}, got {worker_class!r}")
        if not 0 <= port < 65536:
            raise ValueError(f"port {port} is out of range 0-65535")
        if max_requests < 0:
            raise ValueError(f"max_requests must be >= 0, got {max_requests}")
        self.app = app
        self.workers = workers
        self.worker_class = worker_class
        self.host = host
        self.requested_port = port
        self.max_requests = max_requests
        self.reuse_port = reuse_port
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.pythonpath = pythonpath
        self.config_text = config_text
        self.workdir = Path(tempfile.mkdtemp(prefix="accept-watch-gunicorn-"))
        self.log_path = self.workdir / "gunicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    # -- life cycle --------------------------------------------------------------------------------

    @property
    def bind_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literals in brackets

    def command(self) -> list[str]:
        config = self.workdir / "gunicorn.conf.py"
        config.write_text(self.config_text or "# accept-watch: no settings beyond the command line\n")
        cmd = [
            sys.executable, "-m", "gunicorn",
            "--config", str(config),
            "--workers", str(self.workers),
            "--worker-class", WORKER_CLASSES[self.worker_class],
            "--bind", f"{self.bind_host}:{self.requested_port}",
            "--no-control-socket",  # gunicorn 27: otherwise every instance shares ~/.gunicorn/gunicorn.ctl
            "--graceful-timeout", "5",
            "--log-level", "warning",
        ]
        if self.max_requests:
            cmd += ["--max-requests", str(self.max_requests), "--max-requests-jitter", "0"]
        if self.reuse_port:
            cmd.append("--reuse-port")
        if self.pythonpath:
            cmd += ["--pythonpath", self.pythonpath]
        return [*cmd, *self.extra_args, self.app]

    def start(self) -> GunicornProcess:
        if self.proc is not None:
            raise RuntimeError("gunicorn already started")
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = spawn_with_pdeathsig(
                self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    @property
    def master_pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("gunicorn not started")
        return self.proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("port not known yet: call wait_ready() first")
        return self._port

    def worker_pids(self) -> list[int]:
        """The master's current children (its workers), sorted."""
        try:
            return sorted(p.pid for p in psutil.Process(self.master_pid).children())
        except psutil.NoSuchProcess:
            return []

    def listening_port(self) -> int | None:
        """The TCP port the master listens on at self.host (from /proc/net/tcp*, without connecting)."""
        try:
            conns = psutil.Process(self.master_pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            return None
        ports = {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.ip == self.host}
        if len(ports) > 1:
            raise RuntimeError(f"gunicorn master listens on several ports at {self.host}: {sorted(ports)}")
        return ports.pop() if ports else None

    def wait_ready(
        self, timeout_s: float = 30.0, extra_check: Callable[[list[int]], bool] | None = None
    ) -> GunicornProcess:
        """Wait until the listener exists and exactly `workers` workers sit idle in a waiting syscall.

        No probe connection is made: it would be an accept of its own, visible to the kernel side.
        `extra_check(worker_pids)` can add a condition (e.g. the workers' post_worker_init markers).
        The condition must hold on two polls in a row, 50 ms apart.
        """
        waiting = waiting_syscalls()
        deadline = time.monotonic() + timeout_s
        streak = 0
        last = "nothing checked yet"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                tail = log_tail(self.log_path)
                raise RuntimeError(f"gunicorn exited during start-up (code {code}):\n{tail}")
            port = self.listening_port()
            pids = self.worker_pids()
            idle = [pid for pid in pids if current_syscall(pid) in waiting]
            if port is None:
                last = "no listening socket yet"
            elif self.requested_port and port != self.requested_port:
                raise RuntimeError(f"gunicorn listens on {port}, not on {self.requested_port}")
            elif len(pids) != self.workers:
                last = f"{len(pids)} of {self.workers} workers"
            elif len(idle) != self.workers:
                last = f"{len(idle)} of {self.workers} workers idle"
            elif extra_check is not None and not extra_check(pids):
                last = "extra readiness check not met"
            else:
                streak += 1
                if streak >= 2:
                    self._port = port
                    return self
                time.sleep(0.05)
                continue
            streak = 0
            time.sleep(0.05)
        raise TimeoutError(f"gunicorn not ready after {timeout_s:.0f} s ({last}):\n{log_tail(self.log_path)}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the master (graceful), SIGKILL after timeout_s; then make sure no process of its
        session survives (workers orphaned by a killed master). Idempotent."""
        if self.proc is None:
            return
        master = self.proc.pid
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        # The master ran in its own session (sid == pgid == its pid); anything left in it is an orphan.
        leftovers = _session_members(master)
        for p in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        deadline = time.monotonic() + 5.0
        while (alive := _living(leftovers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive:
            raise RuntimeError(f"gunicorn processes survived SIGKILL: {sorted(p.pid for p in alive)}")

    def close(self) -> None:
        """stop() and remove the work directory (its log goes with it)."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> GunicornProcess:
        try:
            return self.start().wait_ready()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def _session_members(sid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                members.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return _living(members)


def _living(procs: Sequence[psutil.Process]) -> list[psutil.Process]:
    """Those still running. A zombie counts as dead: it holds no socket, and an init that does not
    reap orphans (as in some containers) would otherwise make it look immortal."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    return alive
