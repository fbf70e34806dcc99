"""From a target specification to the master process of the server it names, now.

Each resolver returns a master pid (or None: nothing runs for it at the moment, the target is down).
The master is the topmost process of the server's tree that holds its listening sockets (a worker's
pid resolves to it, as in session mode: discovery.resolve_master). `scan_all` finds every listening
socket of the host held by two or more processes, for `serve --all`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping

from . import discovery, sockdiag, units
from .targetspec import TargetSpec

MAX_CMDLINE = 4096
MAX_CANDIDATES = 16  # processes tried per resolution (each try scans one process tree)


class UnknownUnit(Exception):
    """A unit systemd does not know (or, without systemd, no cgroup of that name)."""


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(512)
        return int(stat[stat.rfind(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _start_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(512)
        return int(stat[stat.rfind(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 1 << 62


def tops(pids: Iterable[int]) -> list[int]:
    """The pids whose parent is not among them, oldest first."""
    group = set(pids)
    out = [p for p in group if _ppid(p) not in group]
    return sorted(out, key=lambda p: (_start_ticks(p), p))


def _serving_master(candidates: Iterable[int], exclude: Callable[[int], bool]) -> int | None:
    """The first candidate whose tree holds a listening TCP socket, as its server's master."""
    for pid in list(candidates)[:MAX_CANDIDATES]:
        if exclude(pid) or not discovery.pid_alive(pid):
            continue
        master, _ = discovery.resolve_master(pid)
        if exclude(master):
            continue
        try:
            discovery.discover(master)
        except discovery.DiscoveryError:
            continue
        return master
    return None


def _own(pid: int) -> bool:
    return pid == os.getpid()


def resolve(spec: TargetSpec, exclude: Callable[[int], bool] = _own) -> int | None:
    if spec.kind == "pid":
        pid = int(spec.value)
        return _serving_master([pid], exclude)
    if spec.kind == "pidfile":
        pid = discovery.read_pidfile(str(spec.value))
        return None if pid is None else _serving_master([pid], exclude)
    if spec.kind == "unit":
        state = units.resolve_unit(str(spec.value))
        if not state.pids:
            return None
        order = tops(state.pids)
        if state.main_pid in order:  # systemd's MainPID first
            order.remove(state.main_pid)
            order.insert(0, state.main_pid)
        return _serving_master(order, exclude)
    if spec.kind == "port":
        return _serving_master(tops(port_holders(int(spec.value))), exclude)
    if spec.kind == "match":
        found = {p for p in matching(str(spec.value)) if not exclude(p)}
        # Processes holding a listening socket first: a regex also matches shells, editors, greps...
        inodes = {lst.inode for lst in _listeners()}
        holding = {p for p in found if _holds(p, inodes)}
        return _serving_master([*tops(holding), *(p for p in tops(found) if p not in holding)], exclude)
    raise ValueError(f"unknown target kind {spec.kind!r}")


def _holds(pid: int, inodes: set[int]) -> bool:
    try:
        return bool(discovery.socket_inodes(pid) & inodes)
    except discovery.DiscoveryError:
        return False


def check_unit(spec: TargetSpec) -> None:
    """Refuse a unit name that cannot be a unit here (startup only: a stopped unit is just down)."""
    state = units.resolve_unit(str(spec.value))
    if not state.known:
        raise UnknownUnit(f"unit {spec.value}: no such unit ({state.where})")


def port_holders(port: int) -> set[int]:
    inodes = {lst.inode for lst in _listeners() if lst.port == port}
    return set(discovery.find_holders(inodes))


def _listeners() -> list[sockdiag.Listener]:
    try:
        return sockdiag.listeners()
    except sockdiag.SockDiagError:
        return []


def matching(pattern: str) -> set[int]:
    """Processes whose command line (argv joined by spaces, first 4 KiB) matches."""
    rx = re.compile(pattern)
    out: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                raw = f.read(MAX_CMDLINE)
        except OSError:
            continue
        if raw and rx.search(raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")):
            out.add(int(name))
    return out


def scan_all(owned: Mapping[int, object], exclude: Callable[[int], bool] = _own) -> list[int]:
    """Masters of every server holding a listening socket shared by two or more processes, except
    those already owned by a target. One dump of the listeners, one walk of the fd tables."""
    listeners = _listeners()
    holders = discovery.find_holders({lst.inode for lst in listeners})
    by_inode: dict[int, set[int]] = {}
    for pid, inodes in holders.items():
        for inode in inodes:
            by_inode.setdefault(inode, set()).add(pid)
    masters: list[int] = []
    seen: set[int] = set()
    for pids in by_inode.values():
        if len(pids) < 2 or pids & set(owned) or pids & seen:
            continue
        seen |= pids
        master = _serving_master(tops(pids), exclude)
        if master is not None and master not in owned and master not in masters:
            masters.append(master)
    return masters

