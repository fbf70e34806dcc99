"""How a worker waits for connections, read from /proc (no ptrace, no BPF).

/proc/PID/task/TID/syscall names the syscall each thread is blocked in and its arguments, so the fd
a thread waits on is known: accept4(fd) on a listening socket, epoll_wait(epfd) on an epoll instance
whose /proc/PID/fdinfo/EPFD lists the listener. Each registration line there is printed by the kernel's
ep_show_fdinfo() as "tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x" (fs/eventpoll.c) -
events and ino in hex - and EPOLLEXCLUSIVE is bit 28 of events (include/uapi/linux/eventpoll.h; checked
by experiment: a listener registered with EPOLLIN|EPOLLEXCLUSIVE shows "events: 10000019").

The readings themselves (syscall numbers, fdinfo, poll/select fd sets) are in daemon/procwait.py.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .procwait import (  # noqa: F401 - also read through this module (tests, tools)
    ACCEPT_SYSCALL_NAMES,
    EPOLLEXCLUSIVE,
    WAITING_SYSCALL_NAMES,
    EpollTarget,
    SyscallState,
    _readlink,
    _socket_inode,
    fds_in_fd_set,
    fds_in_pollfds,
    parse_epoll_fdinfo,
    parse_syscall,
    polled_fds,
    read_task_states,
    syscall_table,
)

MODES = ("blocking-accept", "epoll", "epoll-exclusive", "poll/select", "io_uring", "accept-mutex", "unknown")

# Syscall name -> wait category. The order of _CATEGORY_ORDER breaks ties inside one sample: a thread in
# accept() is the most direct evidence of how connections are taken.
_CATEGORY = {
    "accept": "accept",
    "accept4": "accept",
    "epoll_wait": "epoll",
    "epoll_pwait": "epoll",
    "epoll_pwait2": "epoll",
    "io_uring_enter": "io_uring",
    "poll": "poll",
    "select": "poll",
    "pselect6": "poll",
    "ppoll": "poll",
}
_CATEGORY_ORDER = ("accept", "epoll", "io_uring", "poll")

_MAX_EPOLL_NESTING = 4  # the kernel's own limit (EP_MAX_NESTS)


@dataclass(frozen=True, slots=True)
class WaitMode:
    mode: str  # one of MODES
    detail: str  # one line: what was seen
    # What the samples prove about the listener: "listener" (a wait that includes it), "elsewhere"
    # (waits, but on other fds: a master's control loop, an nginx worker without the accept mutex),
    # "" (nothing proven either way).
    evidence: str = ""
    epoll_elsewhere: bool = False  # waits in epoll on a set without the listener (accept-mutex sign)

    def to_dict(self) -> dict[str, str]:
        return {"mode": self.mode, "detail": self.detail}


class _Process:
    """Lazily read fd facts of one process (fd links, epoll registrations)."""

    def __init__(self, pid: int, listener_inodes: set[int]):
        self.pid = pid
        self.inodes = listener_inodes
        self._links: dict[int, str | None] = {}
        self._epoll: dict[int, list[EpollTarget] | None] = {}

    def link(self, fd: int) -> str | None:
        if fd not in self._links:
            self._links[fd] = _readlink(self.pid, fd)
        return self._links[fd]

    def all_fds(self) -> list[int]:
        return sorted(int(name) for name in os.listdir(f"/proc/{self.pid}/fd"))

    def registrations(self, epfd: int) -> list[EpollTarget] | None:
        if epfd not in self._epoll:
            if self.link(epfd) != "anon_inode:[eventpoll]":
                self._epoll[epfd] = None
            else:
                try:
                    with open(f"/proc/{self.pid}/fdinfo/{epfd}") as f:
                        self._epoll[epfd] = parse_epoll_fdinfo(f.read())
                except FileNotFoundError:
                    self._epoll[epfd] = None
        return self._epoll[epfd]

    def watched_listener(self, epfd: int, depth: int = 0) -> EpollTarget | None:
        """The listener registration reachable from this epoll (nested epolls followed), if any."""
        regs = self.registrations(epfd)
        if not regs or depth > _MAX_EPOLL_NESTING:
            return None
        for r in regs:
            if r.ino in self.inodes:
                return r
        for r in regs:
            # A nested epoll shares the one anon inode of all epolls, so follow it by fd number.
            if r.tfd != epfd and self.link(r.tfd) == "anon_inode:[eventpoll]":
                found = self.watched_listener(r.tfd, depth + 1)
                if found:
                    return found
        return None

    def listener_fds(self) -> list[int]:
        return [fd for fd in self.all_fds() if _socket_inode(self.link(fd)) in self.inodes]


@dataclass(frozen=True, slots=True)
class _Obs:
    """What one thread was waiting in, at one sample."""

    category: str  # accept | epoll | io_uring | poll
    verified: bool  # the wait is known to include a listening socket
    syscall: str
    fd: int | None
    tid: int
    exclusive: bool = False

    def rank(self) -> tuple[int, int]:
        return (0 if self.verified else 1, _CATEGORY_ORDER.index(self.category))


def _observe(proc: _Process, tid: int, st: SyscallState, table: dict[int, str]) -> _Obs | str | None:
    """An _Obs for a wait, a syscall name for any other blocked state, None when running."""
    if st.running:
        return None
    if st.nr is None or st.nr < 0:
        return "blocked outside a syscall"
    name = table.get(st.nr, f"syscall {st.nr}")
    category = _CATEGORY.get(name)
    if category is None:
        return name
    fd = st.args[0] if st.args and category in ("accept", "epoll") else None
    if category == "accept":
        ino = _socket_inode(proc.link(fd)) if fd is not None else None
        if proc.inodes and ino not in proc.inodes:
            return f"{name} on a non-listener fd"  # e.g. a unix control socket
        return _Obs(category, bool(proc.inodes), name, fd, tid)
    if category == "epoll":
        target = proc.watched_listener(fd) if fd is not None and proc.inodes else None
        return _Obs(category, target is not None, name, fd, tid, exclusive=bool(target and target.exclusive))
    if category == "poll" and proc.inodes:
        fds = polled_fds(proc.pid, name, st.args)
        if fds is not None:
            if any(_socket_inode(proc.link(fd)) in proc.inodes for fd in fds):
                return _Obs(category, True, name, None, tid)
            return f"{name}() on fds without the listener"
    # io_uring (or a poll set that could not be read): holding a listener is the best evidence.
    return _Obs(category, bool(proc.inodes) and bool(proc.listener_fds()), name, None, tid)


class _Sampler:
    """The votes gathered for one process over several samples."""

    def __init__(self, pid: int, listener_inodes: set[int], table: dict[int, str]):
        self.pid = pid
        self.proc = _Process(pid, listener_inodes)
        self.table = table
        self.samples = 0
        self.votes: Counter[tuple[str, bool, bool]] = Counter()
        self.example: dict[tuple[str, bool, bool], _Obs] = {}
        self.other: Counter[str] = Counter()
        self.denied: str | None = None

    def sample(self) -> None:
        """One look at every thread. Raises ProcessLookupError when the process is gone."""
        if self.denied:
            return
        self.samples += 1
        try:
            states = read_task_states(self.pid)
        except PermissionError:
            self.denied = f"permission denied reading /proc/{self.pid}/task/*/syscall (needs root)"
            return
        best: _Obs | None = None
        others = []
        try:
            for tid, st in sorted(states.items()):
                obs = _observe(self.proc, tid, st, self.table)
                if isinstance(obs, _Obs):
                    if best is None or obs.rank() < best.rank():
                        best = obs
                elif obs is not None:
                    others.append(obs)
        except PermissionError:
            self.denied = f"permission denied reading /proc/{self.pid}/fd (needs root)"
            return
        except FileNotFoundError:
            raise ProcessLookupError(f"no such process: {self.pid}") from None
        if best is not None:
            key = (best.category, best.verified, best.exclusive)
            self.votes[key] += 1
            self.example.setdefault(key, best)
        elif others:
            self.other[", ".join(sorted(set(others)))] += 1
        # else: every thread was running - not a vote either way

    def result(self) -> WaitMode:
        if self.denied:
            return WaitMode("unknown", self.denied)
        samples = self.samples
        waiting = sum(self.votes.values())
        # A wait proven to be on the listener counts even when it is outvoted: a busy worker spends
        # most samples in its request handler (sleeping, reading a database...) and only a few
        # between requests, waiting for the next connection.
        proven = any(verified for (_, verified, _) in self.votes)
        if waiting == 0 or (waiting < sum(self.other.values()) and not proven):
            if self.other:
                what, n = self.other.most_common(1)[0]
                elsewhere = "without the listener" in what or "non-listener" in what
                return WaitMode(
                    "unknown", f"not waiting for connections: blocked in {what} ({n}/{samples} samples)",
                    evidence="elsewhere" if elsewhere else "",
                )
            return WaitMode("unknown", f"running in all {samples} samples (busy); no wait observed")
        key, n = max(self.votes.items(), key=lambda kv: (kv[1], -_rank_key(kv[0])))
        category, verified, exclusive = key
        obs = self.example[key]
        seen = f"{n}/{samples} samples, thread {obs.tid}"
        checked = bool(self.proc.inodes)
        evidence = "listener" if verified else ""
        if category == "accept":
            where = f"listener fd {obs.fd}" if verified else f"fd {obs.fd} (listener not checked)"
            return WaitMode("blocking-accept", f"blocked in {obs.syscall}() on {where} ({seen})", evidence)
        if category == "epoll":
            if verified:
                mode = "epoll-exclusive" if exclusive else "epoll"
                flag = "with EPOLLEXCLUSIVE" if exclusive else "without EPOLLEXCLUSIVE"
                return WaitMode(
                    mode, f"{obs.syscall}() on epoll fd {obs.fd}, which watches the listener {flag} ({seen})",
                    evidence,
                )
            if checked:
                # A master's control loop, or an nginx worker that does not hold the accept mutex
                # (only the holder registers the listener): told apart by resolve_accept_mutex().
                return WaitMode(
                    "unknown",
                    f"not waiting for connections: {obs.syscall}() on epoll fd {obs.fd}, "
                    f"which does not watch the listener ({seen})",
                    "elsewhere", epoll_elsewhere=True,
                )
            return WaitMode("epoll", f"{obs.syscall}() on epoll fd {obs.fd}, listener not checked ({seen})")
        mode = "io_uring" if category == "io_uring" else "poll/select"
        if category == "poll" and verified:
            holds = "the listener is in its fd set"
        elif verified:
            holds = "holds the listener"
        else:
            holds = "no listener fd" if checked else "listener not checked"
        return WaitMode(mode, f"blocked in {obs.syscall}() ({holds}; {seen})", evidence)


def _check_args(samples: int, interval_s: float) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"wait-mode detection: samples must be an integer >= 1, got {samples!r}")
    if not interval_s >= 0:
        raise ValueError(f"wait-mode detection: interval must be >= 0 s, got {interval_s!r}")


def _check_pid(pid: object) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"detect_wait_mode: pid must be a positive integer, got {pid!r}")
    return pid


def detect_wait_mode(
    pid: int,
    listener_inodes: set[int] | frozenset[int] = frozenset(),
    *,
    samples: int = 5,
    interval_s: float = 0.02,
    machine: str | None = None,
) -> WaitMode:
    """How process `pid` waits for connections on the listening sockets `listener_inodes`.

    Every thread is sampled `samples` times, `interval_s` apart; per sample the most telling wait is
    kept (one that provably includes a listener first, then accept > epoll > io_uring > poll/select), and
    the majority over samples where the process was not running decides. With no inodes given, waits
    cannot be tied to a listener and are reported as seen. Raises ProcessLookupError if pid is gone.
    """
    _check_pid(pid)
    _check_args(samples, interval_s)
    sampler = _Sampler(pid, set(listener_inodes), syscall_table(machine))
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        sampler.sample()
    return sampler.result()


def detect_wait_modes(
    pids: Iterable[int],
    listener_inodes: set[int] | frozenset[int] = frozenset(),
    *,
    samples: int = 5,
    interval_s: float = 0.02,
    machine: str | None = None,
) -> dict[int, WaitMode]:
    """detect_wait_mode for many workers in one pass: all are sampled in the same rounds, so the cost is
    samples * interval_s, not that times the number of workers. A process that exits meanwhile is
    reported as mode "unknown" with detail "process exited", not raised: workers come and go.
    """
    _check_args(samples, interval_s)
    table = syscall_table(machine)
    samplers = {pid: _Sampler(_check_pid(pid), set(listener_inodes), table) for pid in pids}
    gone: set[int] = set()
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        for pid, sampler in samplers.items():
            if pid in gone:
                continue
            try:
                sampler.sample()
            except ProcessLookupError:
                gone.add(pid)
    return {
        pid: WaitMode("unknown", "process exited") if pid in gone else sampler.result()
        for pid, sampler in samplers.items()
    }


def _rank_key(key: tuple[str, bool, bool]) -> int:
    category, verified, _ = key
    return (0 if verified else 10) + _CATEGORY_ORDER.index(category)


def resolve_accept_mutex(modes: dict[int, WaitMode], ppid: dict[int, int]) -> dict[int, WaitMode]:
    """nginx's accept_mutex: only the worker holding the mutex has the listener in its epoll set, the
    others wait in epoll on their connections only. Siblings (same parent) of which some epoll-wait
    with the listener registered (without EPOLLEXCLUSIVE) and others epoll-wait without it are
    serialised by the server: all of them get mode "accept-mutex"."""
    out = dict(modes)
    by_parent: dict[int, list[int]] = {}
    for pid in modes:
        if pid in ppid:
            by_parent.setdefault(ppid[pid], []).append(pid)
    for siblings in by_parent.values():
        holders = [p for p in siblings if modes[p].mode == "epoll" and modes[p].evidence == "listener"]
        waiting = [p for p in siblings if modes[p].epoll_elsewhere]
        if not holders or not waiting:
            continue
        n = len(holders) + len(waiting)
        for p in holders + waiting:
            has = "has" if p in holders else "does not have"
            out[p] = WaitMode(
                "accept-mutex",
                f"epoll wait; {len(holders)} of {n} sibling workers had the listener in their epoll set at "
                f"the sample, this one {has} it: the server registers the listener only in the accept-"
                "mutex holder's set (nginx accept_mutex on)",
                "listener",
            )
    return out
