"""Wait-mode detection against real processes blocked in real syscalls."""

from __future__ import annotations

import os
import platform
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from accept_watch.daemon.waitmode import (
    EPOLLEXCLUSIVE,
    detect_wait_mode,
    detect_wait_modes,
    fds_in_fd_set,
    fds_in_pollfds,
    parse_epoll_fdinfo,
    parse_syscall,
    syscall_table,
)

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers checked for x86_64")

# Each child opens a listener, prints its inode, then waits for connections in one way.
PRELUDE = (
    "import os, select, socket, sys, threading, time\n"
    "s = socket.socket()\n"
    "s.bind(('127.0.0.1', 0))\n"
    "s.listen()\n"
    "print(os.fstat(s.fileno()).st_ino, flush=True)\n"
)
ACCEPT = "s.accept()\n"
EPOLL = "ep = select.epoll()\nep.register(s.fileno(), select.EPOLLIN)\nep.poll()\n"
EPOLL_EXCLUSIVE = (
    "ep = select.epoll()\nep.register(s.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)\nep.poll()\n"
)
SELECT = "select.select([s], [], [])\n"
POLL = "p = select.poll()\np.register(s, select.POLLIN)\np.poll()\n"
# The main thread sits in join() (futex); the acceptor is a second thread.
THREAD_ACCEPT = "t = threading.Thread(target=s.accept)\nt.start()\nt.join()\n"
# epoll that watches the listener through a nested epoll instance.
NESTED_EPOLL = (
    "inner = select.epoll()\ninner.register(s.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)\n"
    "outer = select.epoll()\nouter.register(inner.fileno(), select.EPOLLIN)\nouter.poll()\n"
)
# epoll on a pipe only: waiting, but not for connections on the listener.
# gunicorn's arbiter: holds the listener, sleeps in select() on its signal pipe only.
SELECT_ELSEWHERE = "r, w = os.pipe()\nselect.select([r], [], [])\n"
SELECT_SLEEP = "select.select([], [], [], 60)\n"  # Apache's parent: select() as a timer
POLL_ELSEWHERE = "r, w = os.pipe()\np = select.poll()\np.register(r, select.POLLIN)\np.poll()\n"
EPOLL_ELSEWHERE = "r, w = os.pipe()\nep = select.epoll()\nep.register(r, select.EPOLLIN)\nep.poll()\n"
SLEEP = "time.sleep(60)\n"
BUSY = "while True:\n    pass\n"

NR = {
    "accept4": 288,
    "epoll_wait": 232,
    "epoll_pwait": 281,
    "pselect6": 270,
    "select": 23,
    "poll": 7,
    "clock_nanosleep": 230,
}


def _thread_syscalls(pid: int) -> set[int | str]:
    out: set[int | str] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                first = f.read().split()[0]
        except (FileNotFoundError, IndexError):
            continue
        out.add(first if first == "running" else int(first))
    return out


@contextmanager
def child(body: str, *, wait_for: set[int] | None) -> Iterator[tuple[int, int]]:
    """Run PRELUDE + body; yield (pid, listener inode) once a thread is blocked in one of `wait_for`."""
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + body], stdout=subprocess.PIPE, text=True)
    try:
        inode = int(proc.stdout.readline())
        deadline = time.monotonic() + 10
        while wait_for is not None and not (_thread_syscalls(proc.pid) & wait_for):
            assert proc.poll() is None, "child exited early"
            assert time.monotonic() < deadline, f"child never blocked in {wait_for}"
            time.sleep(0.01)
        yield proc.pid, inode
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_blocking_accept() -> None:
    with child(ACCEPT, wait_for={NR["accept4"]}) as (pid, ino):
        wm = detect_wait_mode(pid, {ino})
    assert wm.mode == "blocking-accept"
    assert "accept4() on listener fd" in wm.detail


def test_blocking_accept_in_another_thread() -> None:
    with child(THREAD_ACCEPT, wait_for={NR["accept4"]}) as (pid, ino):
        wm = detect_wait_mode(pid, {ino})
    assert wm.mode == "blocking-accept"


def test_epoll() -> None:
    with child(EPOLL, wait_for={NR["epoll_wait"], NR["epoll_pwait"]}) as (pid, ino):
        wm = detect_wait_mode(pid, {ino})
    assert wm.mode == "epoll"
    assert "watches the listener without EPOLLEXCLUSIVE" in wm.detail


def test_epoll_exclusive() -> None:
    with child(EPOLL_EXCLUSIVE, wait_for={NR["epoll_wait"], NR["epoll_pwait"]}) as (pid, ino):
        wm = detect_wait_mode(pid, {ino})
    assert wm.mode == "epoll-exclusive"


def test_epoll_exclusive_through_a_nested_epoll() -> None:
    with child(NESTED_EPOLL, wait_for={NR["epoll_wait"], NR["epoll_pwait"]}) as (pid, ino):
        wm = detect_wait_mode(pid, {ino})
    assert wm.mode == "epoll-exclusive"


def test_epoll_not_watching_the_listener_is_not_a_connection_wait() -> None:
    with child(EPOLL_ELSEWHERE, wait_for={NR["epoll_wait"], NR["epoll_pwait"]}) as (pid, ino):
        wm = detect_wait_mode(pid, {ino})
        unchecked = detect_wait_mode(pid)
    assert wm.mode == "unknown"
    assert "does not watch the listener" in wm.detail
    assert unchecked.mode == "epoll"  # without inodes the wait cannot be ruled out
    assert "listener not checked" in unchecked.detail


@pytest.mark.parametrize("body", [SELECT, POLL])
def test_poll_and_select(body: str) -> None:
    with child(body, wait_for={NR["pselect6"], NR["select"], NR["poll"]}) as (pid, ino):
        wm = detect_wait_mode(pid, {ino})
    assert wm.mode == "poll/select"
    assert "the listener is in its fd set" in wm.detail  # read from the thread's memory
    assert wm.evidence == "listener"


@pytest.mark.parametrize("body", [SELECT_ELSEWHERE, POLL_ELSEWHERE, SELECT_SLEEP])
def test_poll_or_select_on_other_fds_is_not_a_listener_wait(body: str) -> None:
    with child(body, wait_for={NR["pselect6"], NR["select"], NR["poll"]}) as (pid, ino):
        wm = detect_wait_mode(pid, {ino})
    assert wm.mode == "unknown"
    assert "without the listener" in wm.detail
    assert wm.evidence == "elsewhere"


def test_fd_set_and_pollfd_decoding() -> None:
    raw = bytes([0b0000_0001, 0, 0b1000_0000]) + bytes(5)
    assert fds_in_fd_set(raw, 64) == [0, 23]
    assert fds_in_fd_set(raw, 20) == [0]
    assert fds_in_pollfds(struct.pack("=ihh", 7, 1, 0) + struct.pack("=ihh", -1, 1, 0)) == [7]


def test_accept_on_another_socket_is_not_a_listener_wait() -> None:
    with child(ACCEPT, wait_for={NR["accept4"]}) as (pid, ino):
        wm = detect_wait_mode(pid, {ino + 1_000_000})
    assert wm.mode == "unknown"
    assert "non-listener" in wm.detail


def test_many_workers_in_one_pass() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with (
        child(ACCEPT, wait_for={NR["accept4"]}) as (a_pid, a_ino),
        child(EPOLL_EXCLUSIVE, wait_for={NR["epoll_wait"], NR["epoll_pwait"]}) as (e_pid, e_ino),
    ):
        started = time.monotonic()
        modes = detect_wait_modes([a_pid, e_pid, dead.pid], {a_ino, e_ino}, samples=5, interval_s=0.05)
        elapsed = time.monotonic() - started
    assert modes[a_pid].mode == "blocking-accept"
    assert modes[e_pid].mode == "epoll-exclusive"
    assert (modes[dead.pid].mode, modes[dead.pid].detail) == ("unknown", "process exited")
    assert elapsed < 2 * 5 * 0.05  # sampled together: one set of rounds, not one per process


def test_sleeping_process_is_unknown() -> None:
    with child(SLEEP, wait_for={NR["clock_nanosleep"]}) as (pid, ino):
        wm = detect_wait_mode(pid, {ino})
    assert wm.mode == "unknown"
    assert "clock_nanosleep" in wm.detail


def test_busy_process_is_unknown() -> None:
    with child(BUSY, wait_for=None) as (pid, ino):
        deadline = time.monotonic() + 10
        while "running" not in _thread_syscalls(pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        wm = detect_wait_mode(pid, {ino}, samples=3)
    assert wm.mode == "unknown"
    assert "running" in wm.detail


def test_missing_process_raises() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is free
    with pytest.raises(ProcessLookupError, match=f"no such process: {proc.pid}"):
        detect_wait_mode(proc.pid, set())


@pytest.mark.parametrize("pid", [0, -3, True, "12"])
def test_bad_pid_raises(pid) -> None:
    with pytest.raises(ValueError, match="pid must be a positive integer"):
        detect_wait_mode(pid, set())
    with pytest.raises(ValueError, match="pid must be a positive integer"):
        detect_wait_modes([pid], set())


@pytest.mark.parametrize(("samples", "interval"), [(0, 0.01), (2.5, 0.01), (3, -1.0)])
def test_bad_sampling_arguments_raise(samples, interval) -> None:
    with pytest.raises(ValueError, match="wait-mode detection"):
        detect_wait_mode(os.getpid(), set(), samples=samples, interval_s=interval)


def test_unknown_architecture_raises() -> None:
    with pytest.raises(NotImplementedError, match="riscv64"):
        syscall_table("riscv64")


# ------------------------------------------------------------------------------------------- parsers


def test_epollexclusive_bit_matches_the_kernel_abi() -> None:
    assert EPOLLEXCLUSIVE == select.EPOLLEXCLUSIVE == 0x10000000


def test_fdinfo_of_a_real_epoll_shows_the_exclusive_bit() -> None:
    with socket.socket() as s, select.epoll() as plain, select.epoll() as excl:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ino, fd = os.fstat(s.fileno()).st_ino, s.fileno()
        plain.register(s.fileno(), select.EPOLLIN)
        excl.register(s.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        regs = {}
        for name, ep in (("plain", plain), ("excl", excl)):
            with open(f"/proc/self/fdinfo/{ep.fileno()}") as f:
                (regs[name],) = parse_epoll_fdinfo(f.read())
    assert regs["plain"].ino == regs["excl"].ino == ino
    assert regs["plain"].tfd == fd
    assert not regs["plain"].exclusive
    assert regs["excl"].exclusive


def test_parse_fdinfo_text() -> None:
    text = (
        "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n"
        "tfd:        3 events: 10000019 data:                3  pos:0 ino:2685 sdev:9\n"
        "tfd:       12 events:       19 data:     7fe900000003  pos:0 ino:abc sdev:9\n"
    )
    regs = parse_epoll_fdinfo(text)
    assert [(r.tfd, r.events, r.ino, r.exclusive) for r in regs] == [
        (3, 0x10000019, 0x2685, True),
        (12, 0x19, 0xABC, False),
    ]


def test_parse_syscall_text() -> None:
    st = parse_syscall("288 0x3 0x0 0x0 0x80800 0x0 0x0 0x7ffd1234 0x7f00abcd\n")
    assert (st.running, st.nr, st.args[0], st.args[3]) == (False, 288, 3, 0x80800)
    assert parse_syscall("running\n").running
    assert parse_syscall("-1 0x7ffd 0x7f00\n").nr == -1
    with pytest.raises(ValueError, match="unexpected /proc syscall content"):
        parse_syscall("garbage")
