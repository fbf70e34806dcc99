"""Find a pre-fork server's processes and the listening TCP sockets they share.

Sockets are matched by inode: every process's /proc/PID/fd symlinks name 'socket:[inode]', and the
LISTEN rows of /proc/<master>/net/tcp{,6} (the server's own network namespace) give each listening
inode its address, port and current accept-queue length. psutil cannot do this on its own: its
connection list does not expose inodes, so it cannot tell one inherited socket from a SO_REUSEPORT
group of separate sockets on the same port.
"""

from __future__ import annotations

from dataclasses import dataclass

# The parts discovery is split into; their public names stay importable as discovery.X.
from . import target
from .errors import DiscoveryError
from .listensockets import (
    TCP_LISTEN,
    ListenDepths,
    TcpRow,
    decode_address,
    parse_proc_net_tcp,
    parse_ss_listeners,
    read_listen_depths,
    read_listen_rows,
)
from .proctree import ProcessInfo, lookup_process, pid_alive, process_tree, socket_inodes
from .successors import find_holders, find_successor, read_pidfile, resolve_master

__all__ = [
    "TCP_LISTEN", "DiscoveryError", "ListenDepths", "Listener", "ProcessInfo", "TcpRow", "Topology",
    "decode_address", "discover", "find_holders", "find_successor", "lookup_process",
    "parse_proc_net_tcp", "parse_ss_listeners", "pid_alive", "read_listen_depths", "read_pidfile",
    "refresh", "resolve_master", "socket_inodes",
]


@dataclass(frozen=True, slots=True)
class Listener:
    inode: int
    family: str  # "ipv4" | "ipv6"
    address: str
    port: int
    pids: list[int]  # sorted: every discovered process holding this socket
    mode: str  # "shared" | "reuseport" | "single"


@dataclass(frozen=True, slots=True)
class Topology:
    master_pid: int
    master_cmdline: str
    processes: dict[int, ProcessInfo]  # master and all its descendants
    listeners: list[Listener]  # sorted by (port, address, inode)

    @property
    def ports(self) -> list[int]:
        return sorted({lst.port for lst in self.listeners})

    @property
    def worker_pids(self) -> list[int]:
        return sorted(p for p, info in self.processes.items() if info.role == "worker")

    @property
    def holders(self) -> frozenset[int]:
        """Every process that holds one of the server's listening sockets."""
        return frozenset(p for lst in self.listeners for p in lst.pids)

    @property
    def inodes(self) -> frozenset[int]:
        return frozenset(lst.inode for lst in self.listeners)


def _structural_roles(processes: dict[int, ProcessInfo], listeners: list[Listener]) -> dict[int, ProcessInfo]:
    """Before any evidence (daemon/roles.py decides from what the workers do): the watched process is
    the master, a process holding a listener a worker, any other a helper."""
    holders = {p for lst in listeners for p in lst.pids}
    out = {}
    for pid, info in processes.items():
        role = info.role if info.role == "master" else ("worker" if pid in holders else "helper")
        out[pid] = info if role == info.role else ProcessInfo(info.pid, info.ppid, info.cmdline,
                                                              info.create_time, role)
    return out


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listeners(processes: dict[int, ProcessInfo], rows: list[TcpRow]) -> list[Listener]:
    holders: dict[int, set[int]] = {}
    for pid in processes:
        for inode in socket_inodes(pid):
            holders.setdefault(inode, set()).add(pid)
    held = [r for r in rows if r.inode in holders]
    # SO_REUSEPORT is the only way several LISTEN sockets share one (address, port).
    inodes_per_addr: dict[tuple[str, int], set[int]] = {}
    for r in held:
        inodes_per_addr.setdefault((r.address, r.port), set()).add(r.inode)
    out: dict[int, Listener] = {}
    for r in held:
        pids = sorted(holders[r.inode])
        if len(inodes_per_addr[(r.address, r.port)]) > 1:
            mode = "reuseport"
        elif len(pids) > 1:
            mode = "shared"
        else:
            mode = "single"
        out[r.inode] = Listener(r.inode, r.family, r.address, r.port, pids, mode)
    return sorted(out.values(), key=lambda lst: (lst.port, lst.family, lst.address, lst.inode))


def _scan(master_pid: int) -> Topology:
    processes = process_tree(master_pid)
    rows = read_listen_rows(master_pid)
    listeners = _listeners(processes, rows)
    return Topology(
        master_pid=master_pid,
        master_cmdline=processes[master_pid].cmdline,
        processes=_structural_roles(processes, listeners),
        listeners=listeners,
    )


def discover(master_pid: int) -> Topology:
    """The master, all its descendants and the listening TCP sockets they hold."""
    if master_pid <= 0:
        raise DiscoveryError(f"no process with pid {master_pid}")
    try:
        target.check_master(master_pid)
    except target.TargetError as exc:
        raise DiscoveryError(str(exc)) from None
    topo = _scan(master_pid)
    if not topo.listeners:
        n = len(topo.processes) - 1
        unix = target.unix_listeners(sorted(topo.processes))
        only = (f" (only {unix} listening unix socket{'' if unix == 1 else 's'}: accept-watch counts TCP "
                "accepts, so there is nothing to count)") if unix else ""
        raise DiscoveryError(
            f"pid {master_pid} ({_short(topo.master_cmdline)}) and its {n} descendant{'' if n == 1 else 's'} "
            f"hold no listening TCP socket{only}"
        )
    return topo


def refresh(topology: Topology) -> Topology:
    """Re-scan after workers came and went. Unlike discover(), a moment with no listener (a reload in
    progress) is not an error; a vanished master is (DiscoveryError)."""
    return _scan(topology.master_pid)
