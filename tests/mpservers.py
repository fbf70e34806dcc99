"""Small real multi-process servers, one per way the kernel can hand connections to workers.

A parent process (the "master" accept-watch attaches to with --pid) creates the listening socket(s),
forks N workers and then only waits for them. Each worker records every connection it accepts, right
after accept() returns, as one line "<pid> <monotonic_ns> <peer port>" in <record_dir>/<pid>.log (the
format of tests/servers.py, read with servers.read_records), so tests have per-pid ground truth and,
when clients come one at a time, the exact accept sequence.

Modes:
  accept           workers block in accept() on one shared socket (FIFO wake-up)
  epoll            workers wait in epoll_wait() on the shared socket, registered without EPOLLEXCLUSIVE
  epoll-exclusive  the same, registered with EPOLLIN | EPOLLEXCLUSIVE
  reuseport        the parent creates one SO_REUSEPORT socket per worker on one port before forking;
                   each worker keeps only its own and blocks in accept() on it, the parent keeps none
  asyncio          one process (no fork): an asyncio server whose handler awaits work_ms per request
                   while the event loop keeps accepting

Clean stop: the server runs in its own session (start_new_session), gets SIGTERM if the test process
dies (PR_SET_PDEATHSIG via spawn_with_pdeathsig) and its workers get SIGKILL when the parent dies
(PR_SET_PDEATHSIG set in each worker); stop() kills the process group and checks that no process of
the session survives.

    with start_mp_server("accept", workers=4, work_ms=5) as srv:
        run_clients(srv.port, 400, concurrency=12)
        truth = srv.ground_truth()
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from demo.gunicorn import current_syscall, log_tail, waiting_syscalls
from tests.servers import Record, RecordingServer, spawn_port_reporter

MODES = ("accept", "epoll", "epoll-exclusive", "reuseport", "asyncio", "asyncio-blocking")

# Where an idle worker of each mode sits (syscall names; numbers come from demo.waiting_syscalls()).
_IDLE_SYSCALLS = {
    "accept": frozenset({"accept", "accept4"}),
    "reuseport": frozenset({"accept", "accept4"}),
    "epoll": frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2"}),
    "epoll-exclusive": frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2"}),
    "asyncio": frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2"}),
    "asyncio-blocking": frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2"}),
}

# argv: mode workers work_ms record_dir ready_dir backlog. Prints the port once every socket listens.
# Per connection: accept, record, read the request head, sleep work_ms, answer, close. The worker closes
# right after answering (the whole request was read, so the close is a clean FIN): it is back in its
# waiting syscall while the client still reads, which is what lets epoll's "most recent wins" show.
_SERVER = r'''
import asyncio, ctypes, os, select, signal, socket, sys, time, traceback
mode, nworkers, work_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
record_dir, ready_dir, backlog = sys.argv[4], sys.argv[5], int(sys.argv[6])
RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
libc = ctypes.CDLL(None, use_errno=True)

def log(msg):
    sys.stderr.write(f"[{os.getpid()}] {msg}\n")
    sys.stderr.flush()

def open_record():
    pid = os.getpid()
    fd = os.open(os.path.join(record_dir, f"{pid}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return pid, fd

def mark_ready(pid):
    path = os.path.join(ready_dir, str(pid))
    with open(path + ".tmp", "w") as f:
        f.write(f"{pid} {os.getppid()}\n")
    os.replace(path + ".tmp", path)

def handle(conn):
    try:
        conn.settimeout(5.0)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
        if work_ms:
            time.sleep(work_ms / 1000.0)
        conn.sendall(RESPONSE)
    except OSError as exc:
        log(f"connection error: {exc!r}")
    finally:
        conn.close()

def worker(sock, parent):
    # SIGKILL when the parent dies, so that a killed parent never leaves workers behind. Not
    # demo/pdeathsig.py: these workers are forked, never exec'd, so the call is made in the worker.
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        os._exit(3)
    if os.getppid() != parent:
        os._exit(4)
    pid, fd = open_record()
    if mode in ("accept", "reuseport"):
        mark_ready(pid)
        while True:
            conn, addr = sock.accept()
            os.write(fd, f"{pid} {time.monotonic_ns()} {addr[1]}\n".encode())
            handle(conn)
    ep = select.epoll()
    flags = select.EPOLLIN | (select.EPOLLEXCLUSIVE if mode == "epoll-exclusive" else 0)
    ep.register(sock.fileno(), flags)
    mark_ready(pid)
    while True:
        ep.poll()
        try:
            conn, addr = sock.accept()
        except BlockingIOError:
            continue  # another worker took it (non-exclusive wake-ups wake every waiter)
        os.write(fd, f"{pid} {time.monotonic_ns()} {addr[1]}\n".encode())
        conn.setblocking(True)
        handle(conn)

def listener(port, reuseport):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(backlog)
    return s

def announce(port):
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    os.close(1)

if mode in ("asyncio", "asyncio-blocking"):
    pid, fd = open_record()

    async def slow(reader, writer):
        os.write(fd, f"{pid} {time.monotonic_ns()} {writer.get_extra_info('peername')[1]}\n".encode())
        try:
            await reader.readuntil(b"\r\n\r\n")
            if mode == "asyncio":
                await asyncio.sleep(work_ms / 1000.0)  # other connections are served meanwhile
            else:
                time.sleep(work_ms / 1000.0)  # a blocking call in an async handler: the loop stalls
            writer.write(RESPONSE)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError) as exc:
            log(f"connection error: {exc!r}")
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(slow, "127.0.0.1", 0, backlog=backlog)
        mark_ready(pid)
        announce(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())
    sys.exit(0)

parent = os.getpid()
if mode == "reuseport":
    # Every socket of the group exists (and listens) before the first fork: no free-port race, and
    # the parent closes them all afterwards, so each listener is held by exactly one worker.
    socks = [listener(0, True)]
    port = socks[0].getsockname()[1]
    socks += [listener(port, True) for _ in range(nworkers - 1)]
else:
    socks = [listener(0, False)]
    port = socks[0].getsockname()[1]
    if mode != "accept":
        socks[0].setblocking(False)  # epoll modes: a lost race must not block in accept()
for i in range(nworkers):
    if os.fork() == 0:
        mine = socks[i] if mode == "reuseport" else socks[0]
        for s in socks:
            if s is not mine:
                s.close()
        try:
            worker(mine, parent)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
if mode == "reuseport":
    for s in socks:
        s.close()
announce(port)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    log(f"worker {pid} exited with status {status}")
sys.exit(1)
'''


class MPServer(RecordingServer):
    """A running multi-process server. Context manager: leaving it stops every process."""

    def __init__(self, proc: subprocess.Popen[bytes], mode: str, port: int, workdir: Path) -> None:
        self.proc = proc
        self.mode = mode
        self.port = port
        self.workdir = workdir
        self.record_dir = workdir / "records"
        self.ready_dir = workdir / "ready"
        self.log_path = workdir / "server.log"
        self._final_records: list[Record] | None = None

    @property
    def pid(self) -> int:
        """The parent: the process accept-watch is pointed at."""
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        """The processes that accept (the parent itself in the asyncio modes), from their ready markers."""
        return sorted(int(p.name) for p in self.ready_dir.iterdir() if p.name.isdigit())

    def sequence(self) -> list[int]:
        """The accepting pid of each connection in record order (the exact accept order only when
        connections come one at a time)."""
        return [r.pid for r in self.records()]

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM then SIGKILL the whole process group; raise if any process of the session survives.
        Idempotent."""
        sid = self.proc.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
            deadline = time.monotonic() + timeout_s
            while session_members(sid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.proc.poll() is not None and not session_members(sid):
                return
        left = session_members(sid)
        raise RuntimeError(f"{self.mode} server processes survived SIGKILL: {left}")



def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`. A zombie holds no socket; an init that does not
    reap orphans would otherwise make it look immortal."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the comm: state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            out.append(int(name))
    return sorted(out)


def start_mp_server(
    mode: str, workers: int = 4, work_ms: float = 0.0, backlog: int = 512, timeout_s: float = 15.0
) -> MPServer:
    """Start a server of `mode` (see MODES) and return once every worker has entered its waiting
    syscall (accept() or epoll_wait(), checked in /proc/PID/syscall), so that accept-watch's first
    wait-mode sample sees them waiting. asyncio mode is one process: `workers` must be 1."""
    if mode not in MODES:
        raise ValueError(f"unknown server mode {mode!r} (known: {', '.join(MODES)})")
    if workers < 1 or (mode.startswith("asyncio") and workers != 1):
        raise ValueError(f"{mode} server: bad worker count {workers}")
    if work_ms < 0:
        raise ValueError(f"work_ms must be >= 0, got {work_ms}")
    workdir = Path(tempfile.mkdtemp(prefix=f"accept-watch-mp-{mode}-"))
    (workdir / "records").mkdir()
    (workdir / "ready").mkdir()
    argv = [sys.executable, "-c", _SERVER, mode, str(workers), repr(work_ms), str(workdir / "records"),
            str(workdir / "ready"), str(backlog)]
    try:
        proc, port = spawn_port_reporter(argv, workdir, timeout_s, f"{mode} server")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = MPServer(proc, mode, port, workdir)
    try:
        _wait_idle(server, workers, timeout_s)
    except BaseException:
        server.close()
        raise
    return server


def _wait_idle(server: MPServer, workers: int, timeout_s: float) -> None:
    """Until `workers` workers are ready and all blocked in the mode's waiting syscall."""
    table = waiting_syscalls()
    idle = {nr for nr, name in table.items() if name in _IDLE_SYSCALLS[server.mode]}
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        pids = server.worker_pids()
        states = {pid: current_syscall(pid) for pid in pids}
        if len(pids) == workers and all(nr in idle for nr in states.values()):
            return
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.mode} server exited: {log_tail(server.log_path)}")
        last = f"{len(pids)}/{workers} workers ready, syscalls {states}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.mode} server not idle after {timeout_s} s ({last}): "
                               f"{log_tail(server.log_path)}")
        time.sleep(0.02)


def transitions_of(sequence: list[int]) -> Counter[tuple[int, int]]:
    """(previous pid, pid) -> count over consecutive accepts: what accept-watch counts in the kernel."""
    return Counter(itertools.pairwise(sequence))


__all__ = ["MODES", "MPServer", "session_members", "start_mp_server", "transitions_of"]
