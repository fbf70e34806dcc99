"""Find a pre-fork server's processes and the listening TCP sockets they share.

Sockets are matched by inode: every process's /proc/PID/fd symlinks name 'socket:[inode]', and the
LISTEN rows of /proc/<master>/net/tcp{,6} (the server's own network namespace) give each listening
inode its address, port and current accept-queue length. psutil cannot do this on its own: its
connection list does not expose inodes, so it cannot tell one inherited socket from a SO_REUSEPORT
group of separate sockets on the same port.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil

from . import sockdiag, target

TCP_LISTEN = 0x0A  # include/net/tcp_states.h


class DiscoveryError(Exception):
    """One-line reason why the server could not be inspected."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    ppid: int
    cmdline: str
    create_time: float  # psutil's create_time (seconds since the epoch): tells a reused pid apart
    role: str  # "master" | "worker"


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


@dataclass(frozen=True, slots=True)
class TcpRow:
    """One row of /proc/PID/net/tcp or tcp6."""

    family: str
    address: str
    port: int
    state: int
    rx_queue: int  # for LISTEN rows: sk_ack_backlog, the accept-queue length
    inode: int
    drops: int | None = None  # sk_drops (sock_diag or `ss -m`); /proc/net/tcp does not show it


# ---------------------------------------------------------------------------------------------------
# /proc/net/tcp parsing
# ---------------------------------------------------------------------------------------------------
def decode_address(hex_addr: str) -> str:
    """Address column of /proc/net/tcp{,6}: 8 or 32 hex digits.

    The kernel prints the address as 32-bit words with %08X, i.e. each word's network-order bytes read
    as a host-order integer, so on little-endian hosts every word appears byte-reversed.
    """
    if len(hex_addr) not in (8, 32):
        raise ValueError(f"bad /proc/net/tcp address {hex_addr!r}")
    words = (hex_addr[i : i + 8] for i in range(0, len(hex_addr), 8))
    raw = b"".join(int(w, 16).to_bytes(4, sys.byteorder) for w in words)
    # inet_ntop, not ipaddress: it renders IPv4-mapped addresses as ::ffff:127.0.0.1, like ss does.
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def parse_proc_net_tcp(text: str, family: str) -> list[TcpRow]:
    """All rows of one /proc/PID/net/tcp (family "ipv4") or tcp6 ("ipv6") file."""
    rows: list[TcpRow] = []
    for n, line in enumerate(text.splitlines()):
        fields = line.split()
        if n == 0 or not fields:  # header
            continue
        if len(fields) < 10:
            raise ValueError(f"short /proc/net/tcp line: {line.strip()!r}")
        addr, port = fields[1].split(":")
        _tx, rx = fields[4].split(":")
        rows.append(
            TcpRow(
                family=family,
                address=decode_address(addr),
                port=int(port, 16),
                state=int(fields[3], 16),
                rx_queue=int(rx, 16),
                inode=int(fields[9]),
            )
        )
    return rows


def _ss_address(text: str) -> tuple[str, int]:
    """ss's local address column: 127.0.0.1:80, [::1]:80, [fe80::1]%eth0:80, *:80."""
    host, _, port = text.rpartition(":")
    host = host.split("%", 1)[0].strip("[]")
    return host, int(port)


def _ss_drops(fields: list[str]) -> int | None:
    """d<N> of `ss -m`'s skmem:(r0,rb..,d<N>) field: the socket's sk_drops; None when absent."""
    for f in fields:
        if f.startswith("skmem:(") and f.endswith(")"):
            for item in f[7:-1].split(","):
                if item[:1] == "d" and item[1:].isdigit():
                    return int(item[1:])
    return None


def parse_ss_listeners(text: str, family: str) -> list[TcpRow]:
    """`ss -Hltne` (or -Hltnem) lines: State Recv-Q Send-Q Local Peer ... ino:N ... [skmem:(...)]; for
    LISTEN sockets Recv-Q is the accept-queue length. ss prints skmem on a line of its own after the
    socket's line (a continuation starting with whitespace)."""
    rows: list[TcpRow] = []
    for line in text.splitlines():
        fields = line.split()
        if rows and line[:1].isspace() and (drops := _ss_drops(fields)) is not None:
            rows[-1] = dataclasses.replace(rows[-1], drops=drops)
            continue
        if len(fields) < 5 or fields[0] != "LISTEN":
            continue
        inode = next((int(f[4:]) for f in fields[5:] if f.startswith("ino:")), None)
        if inode is None:
            raise ValueError(f"ss printed no inode: {line.strip()!r}")
        host, port = _ss_address(fields[3])
        if host == "*":
            host = "0.0.0.0" if family == "ipv4" else "::"
        rows.append(TcpRow(family=family, address=host, port=port, state=TCP_LISTEN,
                           rx_queue=int(fields[1]), inode=inode, drops=_ss_drops(fields)))
    return rows



def _denied(what: str) -> str:
    """'access denied ...' with the likely cause: as root, asking for root would be no help."""
    if os.geteuid() != 0:
        return f"access denied {what} (run as root)"
    return (f"access denied {what} although running as root: the kernel refuses it (the process is in "
            "another user namespace or container, or this process lacks CAP_SYS_PTRACE, or an LSM/Yama "
            "policy forbids it)")

def _same_netns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except FileNotFoundError:
        raise DiscoveryError(f"no process with pid {pid}") from None
    except PermissionError:
        raise DiscoveryError(_denied(f"reading /proc/{pid}/ns/net")) from None


def _read_listen_rows(pid: int) -> list[TcpRow]:
    """LISTEN sockets in pid's network namespace, from the kernel's sock_diag, which filters by state
    in the kernel: /proc/net/tcp lists every socket, and a busy server has hundreds of thousands in
    TIME_WAIT (reading it once a second cost 15 % of a core at 10k connections/s). In our own
    namespace we ask sock_diag directly (daemon/sockdiag.py: no process to spawn once a second);
    another namespace goes through `ss` under nsenter, or /proc/PID/net/tcp when ss is missing."""
    if _same_netns(pid):
        try:
            found = sockdiag.listeners()
        except sockdiag.SockDiagError as exc:
            raise DiscoveryError(str(exc)) from None
        if not os.path.exists(f"/proc/{pid}"):
            raise DiscoveryError(f"no process with pid {pid}")
        return [TcpRow(family=lst.family, address=lst.address, port=lst.port, state=TCP_LISTEN,
                       rx_queue=lst.accept_queue, inode=lst.inode, drops=lst.drops) for lst in found]
    if not shutil.which("ss"):
        return _read_listen_rows_proc(pid)
    prefix = ["nsenter", f"--net=/proc/{pid}/ns/net"]
    rows: list[TcpRow] = []
    for flag, family in (("-4", "ipv4"), ("-6", "ipv6")):
        proc = subprocess.run([*prefix, "ss", "-Hltnem", flag], capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            if not os.path.exists(f"/proc/{pid}"):
                raise DiscoveryError(f"no process with pid {pid}")
            raise DiscoveryError(f"ss failed for pid {pid}'s network namespace: {proc.stderr.strip()}")
        rows.extend(parse_ss_listeners(proc.stdout, family))
    if not os.path.exists(f"/proc/{pid}"):
        raise DiscoveryError(f"no process with pid {pid}")
    return rows


def _read_listen_rows_proc(pid: int) -> list[TcpRow]:
    rows: list[TcpRow] = []
    for name, family in (("tcp", "ipv4"), ("tcp6", "ipv6")):
        path = f"/proc/{pid}/net/{name}"
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}"):
                raise DiscoveryError(f"no process with pid {pid}") from None
            continue  # tcp6 is absent when IPv6 is disabled
        except PermissionError:
            raise DiscoveryError(_denied(f"reading {path}")) from None
        except ProcessLookupError:
            raise DiscoveryError(f"no process with pid {pid}") from None
        rows.extend(r for r in parse_proc_net_tcp(text, family) if r.state == TCP_LISTEN)
    return rows


class ListenDepths(dict[int, int]):
    """inode -> accept-queue length, as before; `drops` carries, from the same read, inode -> the
    listener's sk_drops where the kernel showed it (a dict subclass so that callers that only want
    depths need no change)."""

    __slots__ = ("drops",)

    def __init__(self, depths: Mapping[int, int] | None = None,
                 drops: Mapping[int, int] | None = None) -> None:
        super().__init__(depths or {})
        self.drops: dict[int, int] = dict(drops or {})


def read_listen_depths(pid: int, inodes: Iterable[int]) -> ListenDepths:
    """Current accept-queue length (and sk_drops, in `.drops`) of each listening socket, read in pid's
    network namespace.

    Inodes that are no longer listening are absent from the result (not reported as 0).
    Raises DiscoveryError when pid no longer exists.
    """
    wanted = set(inodes)
    rows = [r for r in _read_listen_rows(pid) if r.inode in wanted]
    return ListenDepths({r.inode: r.rx_queue for r in rows},
                        {r.inode: r.drops for r in rows if r.drops is not None})


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited worker its master has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(512)
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2: stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"")


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets in pid's fd table (empty if the process exited meanwhile)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError):
        return set()
    except PermissionError:
        raise DiscoveryError(_denied(f"reading {fd_dir}")) from None
    out: set[int] = set()
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except (FileNotFoundError, ProcessLookupError):
            continue  # fd closed (or process gone) while we were listing
        except PermissionError:
            raise DiscoveryError(_denied(f"reading {fd_dir}")) from None
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _cmdline(proc: psutil.Process) -> str:
    try:
        parts = proc.cmdline()
    except psutil.ZombieProcess:
        parts = []
    return " ".join(parts) if parts else f"[{proc.name()}]"


def _info(proc: psutil.Process, role: str) -> ProcessInfo:
    with proc.oneshot():
        return ProcessInfo(
            pid=proc.pid, ppid=proc.ppid(), cmdline=_cmdline(proc), create_time=proc.create_time(), role=role
        )


def lookup_process(pid: int) -> ProcessInfo | None:
    """A process not found by discovery (e.g. forked between refreshes); None if it is gone."""
    try:
        return _info(psutil.Process(pid), "worker")
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        raise DiscoveryError(_denied(f"to pid {pid}")) from None


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


def _processes(master_pid: int) -> dict[int, ProcessInfo]:
    try:
        master = psutil.Process(master_pid)
        if master.status() == psutil.STATUS_ZOMBIE:
            raise DiscoveryError(f"pid {master_pid} has exited (a zombie not yet reaped by its parent)")
        procs = {master_pid: _info(master, "master")}
        children = master.children(recursive=True)
    except psutil.NoSuchProcess:
        raise DiscoveryError(f"no process with pid {master_pid}") from None
    except psutil.AccessDenied:
        raise DiscoveryError(_denied(f"to pid {master_pid}")) from None
    for child in children:
        try:
            # A zombie is a worker that exited and has not been reaped yet: it accepts nothing.
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            procs[child.pid] = _info(child, "worker")
        except psutil.NoSuchProcess:
            continue  # a worker exiting right now (e.g. --max-requests): the next refresh settles it
        except psutil.AccessDenied:
            raise DiscoveryError(_denied(f"to pid {child.pid}")) from None
    return procs


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
    processes = _processes(master_pid)
    rows = _read_listen_rows(master_pid)
    listeners = _listeners(processes, rows)
    return Topology(
        master_pid=master_pid,
        master_cmdline=processes[master_pid].cmdline,
        processes=_structural_roles(processes, listeners),
        listeners=listeners,
    )


def _listening_ports(pid: int, rows: list[TcpRow]) -> set[int]:
    inodes = socket_inodes(pid)
    return {r.port for r in rows if r.inode in inodes}


def resolve_master(pid: int) -> tuple[int, str | None]:
    """The master of the server that `pid` belongs to: `pid` itself, or, when its parent listens on
    one of the same ports (a worker given by mistake: pre-fork workers inherit or share their
    master's listeners; SO_REUSEPORT workers bind the same port), the topmost such ancestor.
    Returns (master pid, a one-line note when it is not `pid`)."""
    try:
        rows = _read_listen_rows(pid)
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
