"""Small real pre-fork servers, one per balancing set-up the kernel offers (for the analysis tests).

A parent process creates the listening socket (or, for SO_REUSEPORT, lets each worker create its own)
and forks N workers; accept-watch attaches to the parent like to any pre-fork master.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

SERVER = r'''
import asyncio, os, select, socket, sys, time
mode, workers, work_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"

def handle(conn):
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    if work_ms:
        time.sleep(work_ms / 1000)
    conn.sendall(RESPONSE)
    conn.close()

def listener(reuseport=False, port=0):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(512)
    return s

def serve(sock):
    if mode == "accept":                       # blocked in accept(): exclusive FIFO wake-up
        while True:
            conn, _ = sock.accept()
            handle(conn)
    sock.setblocking(False)
    ep = select.epoll()
    flags = select.EPOLLIN | (select.EPOLLEXCLUSIVE if mode == "epoll-exclusive" else 0)
    ep.register(sock.fileno(), flags)
    while True:
        ep.poll()
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            continue                            # another worker won the race
        conn.setblocking(True)
        handle(conn)

async def slow(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(work_ms / 1000)         # the handler is busy; the loop keeps accepting
    writer.write(RESPONSE)
    await writer.drain()
    writer.close()

if mode == "asyncio":
    async def main():
        server = await asyncio.start_server(slow, "127.0.0.1", 0, backlog=512)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()
    asyncio.run(main())
    sys.exit(0)

if mode == "reuseport":
    probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]; probe.close()
    sock = None
else:
    sock = listener(); port = sock.getsockname()[1]
children = []
for _ in range(workers):
    pid = os.fork()
    if pid == 0:
        serve(sock if sock is not None else listener(reuseport=True, port=port))
        os._exit(0)
    children.append(pid)
print(port, flush=True)
while True:                                     # the test kills the whole process group
    time.sleep(3600)
'''


@dataclass
class BalancingServer:
    proc: subprocess.Popen[str]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        try:
            text = open(f"/proc/{self.pid}/task/{self.pid}/children").read()  # noqa: SIM115
        except OSError:
            return []
        return [int(p) for p in text.split()] or [self.pid]


@contextlib.contextmanager
def start_balancing_server(mode: str, workers: int = 4, work_ms: float = 0.0,
                           settle_s: float = 0.5) -> Iterator[BalancingServer]:
    """mode: accept | epoll | epoll-exclusive | reuseport | asyncio (one process)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER, mode, str(workers), str(work_ms)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"balancing server ({mode}) did not start: {line!r}")
        time.sleep(settle_s)  # workers reach their waiting syscall before accept-watch samples it
        yield BalancingServer(proc, int(line))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
