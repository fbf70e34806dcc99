"""Deploy steps on the real servers of tests/realservers*.py that change who the master or the workers
are: nginx's binary upgrade (USR2 to the master, then WINCH and QUIT to the old one) and a
`uvicorn --workers N` worker killed and restarted by uvicorn's supervisor. Each helper returns once the
server is idle again with the expected processes. Only processes started by the launchers are signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.mpservers import session_members
from tests.realservers import (
    _NGINX_CONF,
    NGINX,
    LogServer,
    Nginx,
    _spawn,
    _start_with_free_ports,
    alive,
    children,
    idle,
    listening_ports,
    wait_until,
)
from tests.realservers_py import Uvicorn


class DaemonNginx(Nginx):
    """nginx as a daemon (`daemon on`): its binary upgrade needs it. nginx ignores USR2 while its parent
    is the one it had at start-up, and honours WINCH only when daemonized (ngx_signal_handler: the case
    of `daemon off` under a supervisor). The daemon calls setsid(): its session (the first master's
    pid; a new master forked by USR2 stays in it) is what stop() empties."""

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, ports: list[int], workers: int) -> None:
        super().__init__(proc, workdir, ports, workers)
        self._master: int | None = None

    @property
    def master_pid(self) -> int:
        if self._master is None:
            path = self.workdir / "nginx.pid"
            text = path.read_text().strip() if path.exists() else ""
            if not text.isdigit():
                raise RuntimeError("nginx has not written its pid file yet")
            self._master = int(text)
        return self._master

    def _wait_ready(self, workers: int, timeout_s: float, exclude: Sequence[int] = ()) -> list[int]:
        def ready() -> bool:
            if self.proc.poll() not in (None, 0):
                raise RuntimeError(f"nginx failed to start: {self.tail()}")
            try:
                master = self.master_pid
            except RuntimeError:
                return False
            if not alive(master):
                raise RuntimeError(f"nginx exited during start-up: {self.tail()}")
            pids = [p for p in self.worker_pids() if p not in exclude]
            return len(pids) == workers and idle(pids) and set(self.ports) <= listening_ports(master)

        wait_until(ready, timeout_s, lambda: f"nginx: workers {self.worker_pids()}; {self.tail()}")
        return self.worker_pids()

    def stop(self, timeout_s: float = 10.0) -> None:
        sid = self._master
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout_s)  # the pre-daemon process has exited (or never started nginx)
        if sid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(sid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while session_members(sid) and time.monotonic() < deadline:
            if time.monotonic() > deadline - timeout_s / 2:
                for pid in session_members(sid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)  # nginx's own session: only what we started
            time.sleep(0.05)
        if session_members(sid):
            raise RuntimeError(f"nginx processes survived SIGKILL: {session_members(sid)}")


def start_daemon_nginx(workers: int = 4, timeout_s: float = 20.0) -> DaemonNginx:
    """start_nginx's configuration with `daemon on`."""

    def make(ports: list[int]) -> LogServer:
        workdir = Path(tempfile.mkdtemp(prefix="accept-watch-nginx-up-"))
        (workdir / "tmp").mkdir()
        conf = workdir / "nginx.conf"
        text = _NGINX_CONF.format(workers=workers, dir=workdir, accept_mutex="off",
                                  listens=f"        listen 127.0.0.1:{ports[0]};")
        conf.write_text(text.replace("daemon off;", "daemon on;", 1))
        proc = _spawn([NGINX, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")], workdir)
        return DaemonNginx(proc, workdir, ports, workers)

    return _start_with_free_ports(make, 1, workers, timeout_s)  # type: ignore[return-value]


class NginxUpgrade:
    """nginx's on-the-fly binary upgrade (nginx.org/en/docs/control.html#upgrade): USR2 makes the master
    rename its pid file to nginx.pid.oldbin and exec a new master (its child, inheriting the listening
    sockets), which starts its own workers; WINCH makes the old master stop its workers gracefully;
    QUIT makes it exit. The new master is re-parented to init: our Popen no longer owns it."""

    def __init__(self, srv: Nginx) -> None:
        self.srv = srv
        self.masters = [srv.master_pid]

    @property
    def master(self) -> int:
        return self.masters[-1]

    def workers_of(self, master: int) -> list[int]:
        kids = set(children(master))
        return [p for p in self.srv.logged_workers() if p in kids]

    def usr2(self, timeout_s: float = 20.0) -> int:
        old = self.master
        before = set(children(old))
        os.kill(old, signal.SIGUSR2)
        new: list[int] = []

        def has_new_master() -> bool:
            # The new master is the old one's child that nginx did not log as a worker.
            logged = set(self.srv.logged_workers())
            new[:] = [p for p in children(old) if p not in before and p not in logged and alive(p)]
            if len(new) != 1:
                return False
            workers = self.workers_of(new[0])
            return len(workers) == self.srv.workers and idle(workers)

        wait_until(has_new_master, timeout_s,
                   lambda: f"nginx USR2: no new master under {old}: {children(old)}")
        self.masters.append(new[0])
        return new[0]

    def winch_old(self, timeout_s: float = 20.0) -> list[int]:
        """The old master's workers finish and exit; returns them."""
        old = self.masters[-2]
        workers = self.workers_of(old)
        os.kill(old, signal.SIGWINCH)
        wait_until(lambda: not any(alive(p) for p in workers), timeout_s,
                   lambda: f"nginx WINCH: old workers {[p for p in workers if alive(p)]} still alive")
        return workers

    def quit_old(self, timeout_s: float = 20.0) -> None:
        old = self.masters[-2]
        os.kill(old, signal.SIGQUIT)
        wait_until(lambda: not alive(old), timeout_s, lambda: f"nginx QUIT: old master {old} still alive")

    def close(self) -> None:
        """The new master is not our Popen's process: QUIT it (and its workers) before the launcher's
        stop(), which only reaches the first master's session."""
        for m in reversed(self.masters[1:]):
            if alive(m):
                workers = self.workers_of(m)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(m, signal.SIGQUIT)
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda m=m, w=workers: not alive(m) and not any(alive(p) for p in w), 15.0,
                               lambda: "")
        self.srv.close()


def uvicorn_kill_worker(srv: Uvicorn, pid: int, timeout_s: float = 20.0) -> int:
    """SIGKILL one of `uvicorn --workers N`'s workers; its supervisor starts a replacement (uvicorn
    >= 0.30 checks its workers' health and restarts dead ones). Returns the replacement's pid once it
    waits for connections."""
    before = set(srv.worker_pids())
    if pid not in before:
        raise ValueError(f"pid {pid} is not a worker of this uvicorn")
    os.kill(pid, signal.SIGKILL)
    new: list[int] = []

    def respawned() -> bool:
        now = set(srv.worker_pids())
        new[:] = sorted(now - before)
        return len(now) == len(before) and pid not in now and len(new) == 1 and idle(new)

    wait_until(respawned, timeout_s, lambda: f"uvicorn: workers {srv.worker_pids()} after killing {pid}")
    return new[0]


def pidfile_path(srv: Nginx) -> Path:
    return srv.workdir / "nginx.pid"


__all__ = ["DaemonNginx", "NginxUpgrade", "pidfile_path", "start_daemon_nginx", "uvicorn_kill_worker"]
