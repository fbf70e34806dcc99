"""Listening TCP sockets of a network namespace: sock_diag in our own, `ss` under nsenter (or
/proc/PID/net/tcp) in another; each row's inode, address, port, accept-queue length and drops."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from . import sockdiag
from .errors import DiscoveryError, denied

TCP_LISTEN = 0x0A  # include/net/tcp_states.h


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


def _same_netns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except FileNotFoundError:
        raise DiscoveryError(f"no process with pid {pid}") from None
    except PermissionError:
        raise DiscoveryError(denied(f"reading /proc/{pid}/ns/net")) from None


def read_listen_rows(pid: int) -> list[TcpRow]:
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
            raise DiscoveryError(denied(f"reading {path}")) from None
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
    rows = [r for r in read_listen_rows(pid) if r.inode in wanted]
    return ListenDepths({r.inode: r.rx_queue for r in rows},
                        {r.inode: r.drops for r in rows if r.drops is not None})
