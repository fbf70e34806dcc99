"""Which process is the server: a worker's pid resolved to its master, the successor that carries on
serving the listening sockets after the master exits, and the pid a server's pid file names."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import psutil

from .errors import DiscoveryError
from .listensockets import TcpRow, read_listen_rows
from .proctree import socket_inodes

if TYPE_CHECKING:
    from .discovery import Topology


def _listening_ports(pid: int, rows: list[TcpRow]) -> set[int]:
    inodes = socket_inodes(pid)
    return {r.port for r in rows if r.inode in inodes}


def resolve_master(pid: int) -> tuple[int, str | None]:
    """The master of the server that `pid` belongs to: `pid` itself, or, when its parent listens on
    one of the same ports (a worker given by mistake: pre-fork workers inherit or share their
    master's listeners; SO_REUSEPORT workers bind the same port), the topmost such ancestor.
    Returns (master pid, a one-line note when it is not `pid`)."""
    try:
        rows = read_listen_rows(pid)
    except DiscoveryError:
        return pid, None
    ports = _listening_ports(pid, rows)
    if not ports:
        return pid, None
    master = pid
    for _ in range(64):  # bounded: process trees are not that deep
        try:
            parent = psutil.Process(master).ppid()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            break
        if parent <= 1 or not (_listening_ports(parent, rows) & ports):
            break
        master = parent
    if master == pid:
        return pid, None
    if _has_listening_child(pid, rows, ports):
        # A master itself (its children serve the same sockets): the new generation of a binary
        # upgrade or a USR2 re-exec, still a child of the old master until that one exits.
        return master, (f"pid {pid} is a master started by pid {master} (a new generation sharing its "
                        f"listening socket, as in a binary upgrade): watching both from pid {master}")
    return master, (f"pid {pid} is a worker of pid {master}, which holds the same listening socket: "
                    f"watching the server from pid {master}")


def _has_listening_child(pid: int, rows: list[TcpRow], ports: set[int]) -> bool:
    try:
        children = psutil.Process(pid).children()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(_listening_ports(child.pid, rows) & ports for child in children[:256])


def find_holders(inodes: Iterable[int]) -> dict[int, set[int]]:
    """Every process of the machine holding one of these sockets: pid -> the inodes it holds. Walks
    all fd tables (used when the watched master has gone, to find who still serves its sockets)."""
    wanted = set(inodes)
    found: dict[int, set[int]] = {}
    if not wanted:
        return found
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            held = socket_inodes(int(name)) & wanted
        except DiscoveryError:
            continue  # not ours to read (another user namespace): it cannot be inspected anyway
        if held:
            found[int(name)] = held
    return found


def find_successor(topology: Topology) -> int | None:
    """After the master exits: the process that carries on serving its listening sockets (a gunicorn
    USR2 master re-parented to init, the surviving top of the server's tree), or None. Among the
    holders, the topmost ones (whose parent holds none) are candidates; the one with the most
    holders below it wins, then the oldest."""
    holders = find_holders(topology.inodes)
    holders.pop(topology.master_pid, None)
    if not holders:
        return None
    parent: dict[int, int] = {}
    started: dict[int, float] = {}
    for pid in holders:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            parent[pid], started[pid] = proc.ppid(), proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    tops = [p for p in parent if parent[p] not in parent]
    if not tops:
        return None

    def below(top: int) -> int:
        return sum(1 for p in parent if p != top and _descends(p, top, parent))

    return max(tops, key=lambda p: (below(p), -started[p], -p))


def _descends(pid: int, ancestor: int, parent: Mapping[int, int]) -> bool:
    seen = 0
    while pid in parent and seen < 64:
        pid = parent[pid]
        if pid == ancestor:
            return True
        seen += 1
    return False


def read_pidfile(path: str) -> int | None:
    """The pid in a server's pid file (gunicorn --pid, nginx pid), or None when it is missing or not
    a pid yet (a restart in progress). Read bounded (64 bytes); not created or written, so reading
    through a symlink is harmless."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64)
    except OSError:
        return None
    text = raw.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and 0 < int(text) < 1 << 22 else None
