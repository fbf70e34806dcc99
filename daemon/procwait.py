"""What /proc says a process's threads are blocked in: the syscall and its arguments
(/proc/PID/task/TID/syscall), what an epoll instance watches (/proc/PID/fdinfo/EPFD), and the fds a
poll()/select() waits on (read from the caller's memory, /proc/PID/mem, bounded).

Reading another user's /proc/PID/syscall or mem needs ptrace access (root, or the same user); the daemon
runs as root. Syscall numbers are per architecture; x86_64 and the asm-generic table (aarch64) are known.
daemon/waitmode.py turns these readings into a wait mode; daemon/blocked.py and the demo read them too.
"""

from __future__ import annotations

import os
import platform
import re
import struct
import sys
from dataclasses import dataclass

EPOLLEXCLUSIVE = 1 << 28

# The fd sets of poll()/select() live in the caller's memory; reading them (as root, /proc/PID/mem) tells
# a worker polling the listener from a master polling only its signal pipe (gunicorn's arbiter holds the
# listener and sleeps in select()). Bounded reads: select sets are at most FD_SETSIZE bits, poll arrays
# are read up to MAX_POLL_FDS entries.
FD_SETSIZE = 1024
MAX_POLL_FDS = 4096
_POLLFD_SIZE = 8  # struct pollfd { int fd; short events; short revents; }

_SYSCALLS: dict[str, dict[int, str]] = {
    "x86_64": {
        43: "accept",
        288: "accept4",
        7: "poll",
        23: "select",
        270: "pselect6",
        271: "ppoll",
        232: "epoll_wait",
        281: "epoll_pwait",
        441: "epoll_pwait2",
        426: "io_uring_enter",
        202: "futex",
        35: "nanosleep",
        230: "clock_nanosleep",
        61: "wait4",
        0: "read",
    },
    # asm-generic numbering (include/uapi/asm-generic/unistd.h): no accept/poll/select/epoll_wait there,
    # only their successors.
    "aarch64": {
        202: "accept",
        242: "accept4",
        72: "pselect6",
        73: "ppoll",
        22: "epoll_pwait",
        441: "epoll_pwait2",
        426: "io_uring_enter",
        98: "futex",
        101: "nanosleep",
        115: "clock_nanosleep",
        260: "wait4",
        63: "read",
    },
}

# Where a thread sits while it waits for connections or readiness (any fd): an idle worker, an event
# loop between callbacks. The demo, the test servers and daemon/blocked.py share this list.
WAITING_SYSCALL_NAMES = frozenset({"accept", "accept4", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll",
                                   "ppoll", "select", "pselect6", "io_uring_enter"})
ACCEPT_SYSCALL_NAMES = frozenset({"accept", "accept4"})

_FDINFO_TFD = re.compile(
    r"^tfd:\s*(\d+)\s+events:\s*([0-9a-fA-F]+)\s+data:\s*([0-9a-fA-F]+)\s+.*?\bino:([0-9a-fA-F]+)"
)
_SOCKET_LINK = re.compile(r"^socket:\[(\d+)\]$")
@dataclass(frozen=True, slots=True)
class EpollTarget:
    """One registration of an epoll instance (a line of its fdinfo)."""

    tfd: int
    events: int
    ino: int

    @property
    def exclusive(self) -> bool:
        return bool(self.events & EPOLLEXCLUSIVE)


@dataclass(frozen=True, slots=True)
class SyscallState:
    """One read of /proc/PID/task/TID/syscall."""

    running: bool
    nr: int | None  # None when running; -1 when blocked outside a syscall
    args: tuple[int, ...]


def syscall_table(machine: str | None = None) -> dict[int, str]:
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        raise NotImplementedError(f"wait-mode detection does not know the syscall numbers of {machine}")
    return _SYSCALLS[machine]


def parse_syscall(text: str) -> SyscallState:
    """Parse /proc/PID/syscall: "running", "-1 SP PC", or "NR A1..A6 SP PC" (numbers after NR in hex)."""
    fields = text.split()
    if fields == ["running"]:
        return SyscallState(True, None, ())
    try:
        nr = int(fields[0])
        args = tuple(int(f, 16) for f in fields[1:7]) if nr >= 0 else ()
    except (IndexError, ValueError):
        raise ValueError(f"unexpected /proc syscall content: {text.strip()!r}") from None
    return SyscallState(False, nr, args)


def parse_epoll_fdinfo(text: str) -> list[EpollTarget]:
    """The registrations listed in an epoll fd's /proc/PID/fdinfo."""
    out = []
    for line in text.splitlines():
        m = _FDINFO_TFD.match(line.strip())
        if m:
            out.append(EpollTarget(int(m.group(1)), int(m.group(2), 16), int(m.group(4), 16)))
    return out


def _readlink(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return None  # closed since we listed it


def _socket_inode(link: str | None) -> int | None:
    m = _SOCKET_LINK.match(link or "")
    return int(m.group(1)) if m else None


def _read_mem(pid: int, addr: int, size: int) -> bytes | None:
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.pread(fd, size, addr)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == size else None


def fds_in_fd_set(raw: bytes, nfds: int) -> list[int]:
    """The fds set in a select() fd_set (an array of longs; on little-endian hosts bit fd%8 of byte
    fd//8)."""
    if sys.byteorder != "little":
        raise NotImplementedError("fd_set decoding is written for little-endian hosts")
    return [fd for fd in range(min(nfds, len(raw) * 8)) if raw[fd // 8] >> (fd % 8) & 1]


def fds_in_pollfds(raw: bytes) -> list[int]:
    """The fds of a struct pollfd array (negative fds are ignored by poll())."""
    return [fd for (fd, _ev, _rev) in struct.iter_unpack("=ihh", raw) if fd >= 0]


def polled_fds(pid: int, syscall: str, args: tuple[int, ...]) -> list[int] | None:
    """The read fds a thread blocked in poll/select waits on, from its memory; None if unreadable."""
    if len(args) < 2:
        return None
    if syscall in ("select", "pselect6"):
        nfds, readfds = args[0], args[1]
        if nfds == 0 or not readfds:
            return []  # select() used as a sleep (Apache's parent between its maintenance rounds)
        if nfds > FD_SETSIZE:
            return None
        raw = _read_mem(pid, readfds, (nfds + 7) // 8)
        return None if raw is None else fds_in_fd_set(raw, nfds)
    if syscall in ("poll", "ppoll"):
        ptr, nfds = args[0], args[1]
        if nfds == 0:
            return []
        if nfds > MAX_POLL_FDS or not ptr:
            return None
        raw = _read_mem(pid, ptr, nfds * _POLLFD_SIZE)
        return None if raw is None else fds_in_pollfds(raw)
    return None


def read_task_states(pid: int) -> dict[int, SyscallState]:
    states: dict[int, SyscallState] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise ProcessLookupError(f"no such process: {pid}") from None
    for name in tids:
        try:
            with open(f"/proc/{pid}/task/{name}/syscall") as f:
                states[int(name)] = parse_syscall(f.read())
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited between listdir and open
    if not states and not os.path.exists(f"/proc/{pid}"):
        raise ProcessLookupError(f"no such process: {pid}")
    return states


