"""gunicorn and `uvicorn --workers` for the verdict tests, with lifecycle helpers.

Ground truth is tests/apps/pidapp.py's per-pid record of every request (servers.read_records), turned
into groundtruth.LogRecords (time = CLOCK_MONOTONIC). gunicorn is started by servers.start_gunicorn
(sync, gthread, UvicornWorker, --reuse-port, --max-requests, --pid FILE); GunicornServer adds what the
deploy tests do to it: HUP, TTIN, TTOU, SIGKILL of a worker, USR2 and TERM of the old master, each helper
returning once the server is idle again with the expected workers. uvicorn runs under its own supervisor
(`uvicorn --workers N`), whose workers are the pids it logs as "Started server process [PID]"; its
multiprocessing resource_tracker child is a helper. Only processes started here are signalled.
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
from collections.abc import Sequence
from pathlib import Path

import psutil

from demo.gunicorn import GunicornProcess, log_tail
from tests.groundtruth import LogRecord
from tests.realservers import (
    LoggedWorkers,
    _spawn,
    alive,
    children,
    idle,
    listening_ports,
    wait_until,
)
from tests.servers import (
    _READY_HOOK,
    PIDAPP_ASGI,
    PIDAPP_WSGI,
    REPO_ROOT,
    Record,
    Server,
    read_records,
    start_gunicorn,
)
from tests.watcher import free_port


def to_log_records(records: Sequence[Record], port: int) -> list[LogRecord]:
    return [LogRecord(r.pid, r.mono_ns / 1e9, port) for r in records]


class GunicornServer:
    """A started gunicorn (servers.Server) seen through the LogServer interface, plus deploy helpers."""

    name = "gunicorn"

    def __init__(self, srv: Server, workers: int, port: int | None = None) -> None:
        self.srv = srv
        self._port = port  # --reuse-port: the master holds no socket to read it from
        self.workers = workers  # the number the master keeps (TTIN/TTOU change it)
        self.masters = [srv.master_pid]  # every master, in order (USR2 adds one)
        self.events: list[tuple[str, int]] = []  # (what, pid) lifecycle events we caused

    @property
    def master_pid(self) -> int:
        """The current master."""
        return self.masters[-1]

    @property
    def ports(self) -> list[int]:
        return [self.port]

    @property
    def port(self) -> int:
        return self._port if self._port is not None else self.srv.port

    def worker_pids(self) -> list[int]:
        return sorted(p for m in self.masters if alive(m) for p in children(m) if p not in self.masters)

    def helper_pids(self) -> list[int]:
        return []

    def booted(self) -> dict[int, int]:
        """Every worker that ever booted: pid -> its master (post_worker_init markers)."""
        return self.srv.booted_workers()

    def log_records(self) -> list[LogRecord]:
        return to_log_records(read_records(self.srv.record_dir), self.port)

    def records(self) -> list[LogRecord]:
        return to_log_records(self.srv.records(), self.port)

    def boot_times(self) -> dict[int, float]:
        """When each worker finished booting (its post_worker_init marker), in the records' clock
        (CLOCK_MONOTONIC seconds): the marker's mtime is CLOCK_REALTIME, shifted by the current offset
        between the two clocks. Read while the server's files exist."""
        offset_ns = time.time_ns() - time.monotonic_ns()
        out: dict[int, float] = {}
        for path in self.srv.ready_dir.iterdir():
            if path.name.isdigit():
                out[int(path.name)] = (path.stat().st_mtime_ns - offset_ns) / 1e9
        return out

    # -- lifecycle ---------------------------------------------------------------------------------

    def _signal(self, pid: int, sig: int) -> None:
        if pid not in self.masters and pid not in self.booted():
            raise ValueError(f"pid {pid} is not a process of this gunicorn")
        os.kill(pid, sig)
        self.events.append((signal.Signals(sig).name, pid))

    def wait_workers(
        self, master: int, n: int, exclude: Sequence[int] = (), timeout_s: float = 30.0
    ) -> list[int]:
        """Until `master` has exactly n booted, idle workers and none of `exclude` is alive."""
        def ready() -> bool:
            pids = children(master)
            booted = self.booted()
            return (len(pids) == n and all(p in booted for p in pids) and idle(pids)
                    and not any(alive(p) for p in exclude))

        wait_until(ready, timeout_s, lambda: f"gunicorn {master}: children {children(master)}")
        return children(master)

    def hup(self) -> list[int]:
        """Reload: the master starts new workers and stops the old ones gracefully."""
        old = children(self.master_pid)
        self._signal(self.master_pid, signal.SIGHUP)
        return self.wait_workers(self.master_pid, self.workers, exclude=old)

    def ttin(self) -> list[int]:
        self._signal(self.master_pid, signal.SIGTTIN)
        self.workers += 1
        return self.wait_workers(self.master_pid, self.workers)

    def ttou(self) -> list[int]:
        old = children(self.master_pid)
        self._signal(self.master_pid, signal.SIGTTOU)
        self.workers -= 1
        pids = self.wait_workers(self.master_pid, self.workers)
        self.events.append(("exited", next(p for p in old if p not in pids)))
        return pids

    def kill_worker(self, pid: int) -> list[int]:
        """SIGKILL one worker; the master forks a replacement."""
        self._signal(pid, signal.SIGKILL)
        return self.wait_workers(self.master_pid, self.workers, exclude=[pid])

    def usr2(self, timeout_s: float = 30.0) -> int:
        """Re-exec: the old master forks a new master (same listening socket, passed by fd), which starts
        its own workers. Returns the new master once they are all idle."""
        old = self.master_pid
        before = set(children(old))
        self._signal(old, signal.SIGUSR2)
        new: list[int] = []

        def has_new_master() -> bool:
            # The new master is the old one's child that has children of its own (workers never do).
            new[:] = [p for p in children(old) if p not in before and children(p)]
            return len(new) == 1

        wait_until(has_new_master, timeout_s, lambda: f"no new master under {old}: {children(old)}")
        self.masters.append(new[0])
        self.wait_workers(new[0], self.workers, timeout_s=timeout_s)
        return new[0]

    def term_old_master(self, timeout_s: float = 30.0) -> None:
        """TERM the previous master (after usr2): it and its workers exit; the new generation serves."""
        old = self.masters[-2]
        old_workers = [p for p, m in self.booted().items() if m == old]
        self._signal(old, signal.SIGTERM)
        wait_until(lambda: not alive(old) and not any(alive(p) for p in old_workers), timeout_s,
                   lambda: f"old master {old} still alive or its workers {old_workers}")

    def stop(self) -> None:
        # A USR2 successor was reparented away from our Popen: TERM it gracefully first.
        for m in reversed(self.masters[1:]):
            if alive(m):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(m, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda m=m: not alive(m), 15.0, lambda: "")
        self.srv.stop()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.srv.close()

    def __enter__(self) -> GunicornServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_gunicorn_server(
    workers: int = 4, kind: str = "sync", max_requests: int = 0, reuse_port: bool = False,
    pidfile: Path | None = None, sleep_ms: float = 0,
) -> GunicornServer:
    """kind: "sync", "gthread" (4 threads), "uvicorn" (UvicornWorker), "gevent", "eventlet", "tornado"."""
    extra: list[str] = []
    worker_class = "uvicorn" if kind == "uvicorn" else "sync"
    if kind == "gthread":
        # Later options win in gunicorn's parser: the launcher knows sync and uvicorn only.
        extra += ["--worker-class", "gthread", "--threads", "4"]
    elif kind in ("gevent", "eventlet", "tornado"):
        extra += ["--worker-class", kind]  # the WSGI pid app; each runs it in its own event loop
    elif kind not in ("sync", "uvicorn"):
        raise ValueError(f"unknown gunicorn kind {kind!r}")
    if pidfile is not None:
        extra += ["--pid", str(pidfile)]
    if reuse_port:
        return _start_reuse_port(workers, worker_class, extra)
    env = {"PIDAPP_NO_PEER_PORT": "1"} if kind == "tornado" else None
    srv = start_gunicorn(workers=workers, worker_class=worker_class, max_requests=max_requests,
                         reuse_port=reuse_port, extra_args=extra, sleep_ms=sleep_ms, extra_env=env)
    return GunicornServer(srv, workers)


def _start_reuse_port(workers: int, worker_class: str, extra: list[str]) -> GunicornServer:
    """gunicorn --reuse-port (>= 23): each worker binds its own SO_REUSEPORT socket and the master holds
    none, so the port is picked here (free now; another taker makes the start fail: retried twice with
    a new one)."""
    last: BaseException | None = None
    for _ in range(3):
        try:
            return _reuse_port_on(free_port(), workers, worker_class, extra)
        except (RuntimeError, TimeoutError) as exc:
            if "in use" not in str(exc):
                raise
            last = exc
    raise RuntimeError(f"gunicorn --reuse-port: no free port after 3 tries: {last}")


def _reuse_port_on(
    port: int, workers: int, worker_class: str, extra: list[str], timeout_s: float = 30.0
) -> GunicornServer:
    """servers.start_gunicorn's setup (the pid app, the ready hook) with readiness taken from the workers:
    each listening on the port, idle, past post_worker_init."""
    gunicorn = GunicornProcess(PIDAPP_ASGI if worker_class == "uvicorn" else PIDAPP_WSGI, workers=workers,
                               worker_class=worker_class, port=port, reuse_port=True, extra_args=extra,
                               pythonpath=str(REPO_ROOT))
    record_dir, ready_dir = gunicorn.workdir / "records", gunicorn.workdir / "ready"
    record_dir.mkdir()
    ready_dir.mkdir()
    gunicorn.config_text = _READY_HOOK.format(ready_dir=str(ready_dir))
    gunicorn.env.update({"PIDAPP_RECORD_DIR": str(record_dir), "PIDAPP_SLEEP_MS": "0"})
    try:
        gunicorn.start()

        def ready() -> bool:
            if gunicorn.proc is not None and gunicorn.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited during start-up: {log_tail(gunicorn.log_path)}")
            pids = children(gunicorn.master_pid)
            return (len(pids) == workers and all((ready_dir / str(p)).exists() for p in pids)
                    and idle(pids) and all(port in listening_ports(p) for p in pids))

        wait_until(ready, timeout_s, lambda: f"gunicorn --reuse-port: {log_tail(gunicorn.log_path)}")
    except BaseException:
        gunicorn.close()
        raise
    return GunicornServer(Server(gunicorn, record_dir, ready_dir), workers, port)


# -- uvicorn --workers ------------------------------------------------------------------------------

_STARTED = re.compile(r"Started server process \[(\d+)\]")


class Uvicorn(LoggedWorkers):
    """`uvicorn --workers N` (uvicorn's own supervisor) serving the pid app."""

    name = "uvicorn"

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, ports: list[int]) -> None:
        super().__init__(proc, workdir, ports)
        self.record_dir = workdir / "records"

    single = False  # --workers 1: uvicorn serves in the process started (no supervisor, no children)

    def worker_pids(self) -> list[int]:
        if self.single:
            return [self.master_pid] if self.master_pid in self.logged_workers() else []
        return super().worker_pids()

    def helper_pids(self) -> list[int]:
        return [] if self.single else super().helper_pids()

    def logged_workers(self) -> list[int]:
        """Every worker uvicorn says it started ("Started server process [PID]")."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return sorted({int(m) for m in _STARTED.findall(text)})

    def log_records(self) -> list[LogRecord]:
        return to_log_records(read_records(self.record_dir), self.port)


def start_uvicorn(workers: int = 4, timeout_s: float = 30.0) -> Uvicorn:
    workdir = Path(tempfile.mkdtemp(prefix="accept-watch-uvicorn-"))
    (workdir / "records").mkdir()
    argv = [sys.executable, "-m", "uvicorn", PIDAPP_ASGI, "--app-dir", str(REPO_ROOT), "--host", "127.0.0.1",
            "--port", "0", "--workers", str(workers), "--log-level", "info", "--no-access-log"]
    env = {**os.environ, "PIDAPP_RECORD_DIR": str(workdir / "records"), "PIDAPP_SLEEP_MS": "0"}
    try:
        proc = _spawn(argv, workdir, env=env)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = Uvicorn(proc, workdir, [])
    server.single = workers == 1
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited during start-up: {server.tail()}")
            ports = listening_ports(proc.pid)
            pids = server.worker_pids()
            if len(ports) == 1:
                server.ports = sorted(ports)
            return len(ports) == 1 and len(pids) == workers and idle(pids)

        wait_until(ready, timeout_s, lambda: f"uvicorn: workers {server.worker_pids()}; {server.tail()}")
    except BaseException:
        server.close()
        raise
    return server


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return ""


__all__ = ["GunicornServer", "Uvicorn", "cmdline", "start_gunicorn_server", "start_uvicorn",
           "to_log_records"]
