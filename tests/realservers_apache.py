"""Apache's threaded MPMs (event, worker) and its graceful restart / graceful stop, for the real-server
tests. Ground truth is Apache's own access log, "%P %{usec}t %{local}p" (the child that served the
connection; in the threaded MPMs that child's listener thread accepted it).

An event or worker child is one process with a listener thread and ThreadsPerChild worker threads: the
child is the accepting "worker" (accept-watch attributes accepts to processes). A child is ready when
one of its threads waits in a waiting syscall (its main thread sits in a futex joining the others).

Graceful restart (SIGUSR1, what `apachectl -k graceful` sends): the parent re-reads its config, bumps
its generation and starts new children; old children finish the connections they hold and exit. Old
and new children are told apart by the generation Apache keeps in its scoreboard, which is not visible
from outside, so by membership: the children present before the signal are the old generation.
Only processes started here are signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from demo.gunicorn import current_syscall, waiting_syscalls
from tests.realservers import (
    APACHE,
    APACHE_BASE_CONF,
    APACHE_MODULES,
    Apache,
    LogServer,
    _spawn,
    _start_with_free_ports,
    alive,
    children,
    wait_until,
)

_APACHE_THREADED_CONF = APACHE_BASE_CONF + """\
ServerLimit {limit}
ThreadLimit {threads}
ThreadsPerChild {threads}
MinSpareThreads {threads}
MaxSpareThreads {total}
MaxRequestWorkers {total}
MaxConnectionsPerChild 0
GracefulShutdownTimeout 10
"""


def _threads_waiting(pid: int) -> bool:
    """Some thread of pid is in a waiting syscall (accept, poll, epoll)."""
    waiting = waiting_syscalls()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                nr = f.read().split()[0]
        except (OSError, IndexError):
            continue
        if nr.lstrip("-").isdigit() and int(nr) in waiting:
            return True
    return False


class ApacheThreaded(Apache):
    """Apache with the event or worker MPM."""

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, ports: list[int], mpm: str,
                 workers: int) -> None:
        super().__init__(proc, workdir, ports)
        self.name = f"apache2-{mpm}"
        self.mpm = mpm
        self.workers = workers
        self.generations: list[list[int]] = []  # the children of each generation, as started

    def _wait_ready(self, workers: int, timeout_s: float,
                    exclude: Sequence[int] = ()) -> list[int]:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up: {self.tail()}")
            pids = [p for p in self.worker_pids() if p not in exclude]
            return len(pids) == workers and all(_threads_waiting(p) for p in pids)

        wait_until(ready, timeout_s, lambda: f"{self.name}: children {self.worker_pids()}; {self.tail()}")
        pids = self.worker_pids()
        self.generations.append(pids)
        return pids

    def graceful(self, timeout_s: float = 20.0) -> list[int]:
        """SIGUSR1 (apachectl -k graceful): new children start; the old ones finish and exit. Returns
        the new children once they wait for connections and every old one has exited."""
        old = self.worker_pids()
        os.kill(self.master_pid, signal.SIGUSR1)
        wait_until(lambda: not any(alive(p) for p in old), timeout_s,
                   lambda: f"{self.name} graceful: old children {[p for p in old if alive(p)]} still alive")
        return self._wait_ready(self.workers, timeout_s, exclude=old)

    def graceful_stop(self, timeout_s: float = 20.0) -> None:
        """SIGWINCH (apachectl -k graceful-stop): the parent stops listening, children finish, all exit."""
        os.kill(self.master_pid, signal.SIGWINCH)
        wait_until(lambda: self.proc.poll() is not None, timeout_s,
                   lambda: f"{self.name} graceful-stop: still running, children {children(self.master_pid)}")


def start_apache_threaded(mpm: str = "event", workers: int = 2, threads: int = 4,
                          timeout_s: float = 20.0) -> ApacheThreaded:
    """Debian's apache2 with the event or worker MPM: `workers` children of `threads` threads each."""
    if mpm not in ("event", "worker"):
        raise ValueError(f"unknown threaded MPM {mpm!r}")

    def make(ports: list[int]) -> LogServer:
        workdir = Path(tempfile.mkdtemp(prefix=f"accept-watch-apache-{mpm}-"))
        workdir.chmod(0o755)  # children run as www-data and read htdocs
        (workdir / "run").mkdir()
        (workdir / "htdocs").mkdir()
        (workdir / "htdocs" / "index.html").write_text("ok\n")
        conf = workdir / "apache2.conf"
        # ServerLimit leaves room for a graceful restart's second generation.
        conf.write_text(_APACHE_THREADED_CONF.format(
            dir=workdir, mods=APACHE_MODULES, port=ports[0], mpm=mpm, loglevel="notice", workers=workers,
            threads=threads,
            limit=2 * workers, total=workers * threads))
        proc = _spawn([APACHE, "-f", str(conf), "-D", "FOREGROUND"], workdir)
        return ApacheThreaded(proc, workdir, ports, mpm, workers)

    return _start_with_free_ports(make, 1, workers, timeout_s)  # type: ignore[return-value]


__all__ = ["ApacheThreaded", "current_syscall", "start_apache_threaded"]
