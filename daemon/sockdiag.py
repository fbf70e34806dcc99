"""Listening TCP sockets of this process's network namespace, straight from the kernel's sock_diag.

The daemon reads every listener's accept-queue length once a second. Running `ss` for that cost a
fork and an exec each time (and `ss`'s own CPU, which a process's CPU figures do not include);
/proc/net/tcp lists every socket, TIME_WAIT included (hundreds of thousands on a busy server).
A NETLINK_SOCK_DIAG dump asks the kernel for LISTEN sockets only and parses a few hundred bytes.

Works without root for the caller's own network namespace; other namespaces go through `ss` run
under nsenter (see discovery.py).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
INET_DIAG_SKMEMINFO = 7  # the rtattr carrying u32 sk_meminfo[SK_MEMINFO_VARS]
SK_MEMINFO_DROPS = 8  # index of sk_drops in that array (include/uapi/linux/sock_diag.h)

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid (all zero: no filter)
_REQ = struct.Struct("=BBBxI48x")
# inet_diag_msg: family, state, timer, retrans; sockid: sport, dport (big-endian), src[16], dst[16],
# if, cookie[2]; then expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
_RTATTR = struct.Struct("=HH")  # rta_len, rta_type


class SockDiagError(Exception):
    """The kernel refused or cut short a sock_diag dump (one-line reason)."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True, slots=True)
class Listener:
    family: str  # "ipv4" | "ipv6"
    address: str
    port: int
    accept_queue: int  # connections waiting for accept() (idiag_rqueue of a LISTEN socket)
    backlog_limit: int  # listen() backlog as the kernel applies it (idiag_wqueue)
    inode: int
    # sk_drops: for a listener, every SYN or completed handshake dropped because its accept queue (or
    # the SYN queue) was full -- the per-socket share of the host-wide ListenDrops. None when the kernel
    # sent no INET_DIAG_SKMEMINFO (or one too short to hold it).
    drops: int | None = None


TCP_ESTABLISHED = 1
TCP_CLOSE_WAIT = 8


@dataclass(frozen=True, slots=True)
class Connection:
    port: int  # local port
    unread: int  # bytes received and not yet read by the application (idiag_rqueue)
    inode: int


def _request(family: int, seq: int, states: int = 1 << TCP_LISTEN, meminfo: bool = False) -> bytes:
    # idiag_ext is a bitmask of (1 << (attribute - 1)): ask for sk_meminfo only where it is read.
    ext = 1 << (INET_DIAG_SKMEMINFO - 1) if meminfo else 0
    body = _REQ.pack(family, socket.IPPROTO_TCP, ext, states)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0)
    return header + body


def skmem_drops(data: bytes, start: int, end: int) -> int | None:
    """sk_drops from the INET_DIAG_SKMEMINFO rtattr among those in data[start:end], or None."""
    offset = start
    while offset + _RTATTR.size <= end:
        length, rtype = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            return None  # malformed attribute: what follows cannot be trusted
        payload = length - _RTATTR.size
        if rtype == INET_DIAG_SKMEMINFO and payload >= 4 * (SK_MEMINFO_DROPS + 1):
            (drops,) = struct.unpack_from("=I", data, offset + _RTATTR.size + 4 * SK_MEMINFO_DROPS)
            return int(drops)
        offset += (length + 3) & ~3  # RTA_ALIGN
    return None


def parse_messages(data: bytes, family_name: str) -> tuple[list[Listener | Connection], bool]:
    """Sockets in one datagram of a dump (LISTEN ones as Listener, others as Connection), and whether
    the dump ended (NLMSG_DONE)."""
    out: list[Listener | Connection] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise SockDiagError(f"malformed netlink message (length {length})")
        body = offset + _NLMSGHDR.size
        if mtype == NLMSG_DONE:
            return out, True
        if mtype == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, body)
            if err == 0:  # an acknowledgement, not an error
                offset += (length + 3) & ~3
                continue
            raise SockDiagError(f"sock_diag refused the dump: {os.strerror(-err)}", -err)
        if mtype == SOCK_DIAG_BY_FAMILY and length - _NLMSGHDR.size >= _MSG.size:
            (fam, state, _timer, _retrans, sport, _dport, src, _dst, _ifindex, _cookie,
             _expires, rqueue, wqueue, _uid, inode) = _MSG.unpack_from(data, body)
            if state == TCP_LISTEN:
                raw = src[:4] if fam == socket.AF_INET else src
                drops = skmem_drops(data, body + _MSG.size, offset + length)
                out.append(Listener(family=family_name, address=str(ipaddress.ip_address(raw)),
                                    port=struct.unpack("!H", sport)[0], accept_queue=rqueue,
                                    backlog_limit=wqueue, inode=inode, drops=drops))
            else:
                out.append(Connection(port=struct.unpack("!H", sport)[0], unread=rqueue, inode=inode))
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return out, False


def _read_dump(nl: socket.socket, family_name: str) -> list[Listener | Connection]:
    out: list[Listener | Connection] = []
    while True:
        try:
            data = nl.recv(65536)
        except OSError as exc:
            raise SockDiagError(f"sock_diag dump failed: {exc.strerror or exc}") from None
        found, done = parse_messages(data, family_name)
        out.extend(found)
        if done:
            return out


def listeners() -> list[Listener]:
    """Every listening TCP socket (IPv4 and IPv6) in this process's network namespace."""
    return [s for s in _dump(1 << TCP_LISTEN, meminfo=True) if isinstance(s, Listener)]


def connections(ports: set[int]) -> dict[int, int]:
    """inode -> unread bytes of every established (or peer-closed) TCP socket whose local port is one
    of `ports`: connections a server accepted, with the request bytes it has not read yet."""
    states = (1 << TCP_ESTABLISHED) | (1 << TCP_CLOSE_WAIT)
    return {s.inode: s.unread for s in _dump(states) if isinstance(s, Connection) and s.port in ports}


def _dump(states: int, meminfo: bool = False) -> list[Listener | Connection]:
    out: list[Listener | Connection] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5.0)
        for seq, (family, name) in enumerate(((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")), 1):
            nl.sendall(_request(family, seq, states, meminfo))
            try:
                out.extend(_read_dump(nl, name))
            except SockDiagError as exc:
                if family == socket.AF_INET6 and exc.errno == errno.ENOENT:
                    continue  # no IPv6 in this kernel: no IPv6 listeners
                raise
    return out
