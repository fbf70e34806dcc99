"""daemon/sockdiag.py against real sockets, and against iproute2's ss as an independent reader."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time

import pytest

from accept_watch.daemon import discovery, sockdiag


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _find(inode: int) -> sockdiag.Listener:
    found = [lst for lst in sockdiag.listeners() if lst.inode == inode]
    assert len(found) == 1, found
    return found[0]


def test_ipv4_listener_queue_and_backlog() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(17)
        port = srv.getsockname()[1]
        lst = _find(_inode(srv))
        assert (lst.family, lst.address, lst.port, lst.accept_queue, lst.backlog_limit) == (
            "ipv4", "127.0.0.1", port, 0, 17)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            deadline = time.monotonic() + 5
            while _find(_inode(srv)).accept_queue != 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _find(_inode(srv)).accept_queue == 3
            srv.accept()[0].close()
            assert _find(_inode(srv)).accept_queue == 2
        finally:
            for c in clients:
                c.close()
    assert not [lst for lst in sockdiag.listeners() if lst.port == port]


def test_ipv6_listener() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    with socket.socket(socket.AF_INET6) as srv:
        srv.bind(("::1", 0))
        srv.listen(5)
        lst = _find(_inode(srv))
        port = srv.getsockname()[1]
        assert (lst.family, lst.address, lst.port, lst.backlog_limit) == ("ipv6", "::1", port, 5)


def test_agrees_with_ss() -> None:
    if not shutil.which("ss"):
        pytest.skip("iproute2's ss is not installed")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        ss_rows = []
        for flag, family in (("-4", "ipv4"), ("-6", "ipv6")):
            out = subprocess.run(["ss", "-Hltne", flag], capture_output=True, text=True, check=True).stdout
            ss_rows += discovery.parse_ss_listeners(out, family)
        ours = sockdiag.listeners()
        inode = _inode(srv)
    # ss prints "*" for a wildcard address, which parse_ss_listeners turns into 0.0.0.0 / ::
    assert {(r.inode, r.port, r.address, r.family) for r in ss_rows} == {
        (lst.inode, lst.port, lst.address, lst.family) for lst in ours}
    assert inode in {lst.inode for lst in ours}


def _nlmsg(mtype: int, body: bytes) -> bytes:
    length = 16 + len(body)
    pad = b"\0" * (-length % 4)
    return struct.pack("=IHHII", length, mtype, 0, 1, 0) + body + pad


def test_parse_error_ack_and_done() -> None:
    with pytest.raises(sockdiag.SockDiagError, match="Operation not permitted") as exc:
        sockdiag.parse_messages(_nlmsg(sockdiag.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16), "ipv4")
    assert exc.value.errno == 1
    ack = _nlmsg(sockdiag.NLMSG_ERROR, struct.pack("=i", 0) + b"\0" * 16)
    found, done = sockdiag.parse_messages(ack + _nlmsg(sockdiag.NLMSG_DONE, b"\0" * 4), "ipv4")
    assert (found, done) == ([], True)


def test_parse_listener_record_and_malformed_length() -> None:
    body = struct.pack("=BBBB", socket.AF_INET, sockdiag.TCP_LISTEN, 0, 0) + struct.pack("!HH", 8080, 0)
    body += socket.inet_aton("10.1.2.3") + b"\0" * 12 + b"\0" * 16 + b"\0" * 12
    body += struct.pack("=IIIII", 0, 4, 128, 0, 4242)
    found, done = sockdiag.parse_messages(_nlmsg(sockdiag.SOCK_DIAG_BY_FAMILY, body), "ipv4")
    assert not done
    assert found == [sockdiag.Listener("ipv4", "10.1.2.3", 8080, 4, 128, 4242)]
    with pytest.raises(sockdiag.SockDiagError, match="malformed"):
        sockdiag.parse_messages(struct.pack("=IHHII", 9999, 20, 0, 1, 0), "ipv4")


def _rtattr(rtype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, rtype) + payload + b"\0" * (-length % 4)


def test_parse_skmeminfo_drops() -> None:
    body = struct.pack("=BBBB", socket.AF_INET, sockdiag.TCP_LISTEN, 0, 0) + struct.pack("!HH", 8080, 0)
    body += socket.inet_aton("10.1.2.3") + b"\0" * 12 + b"\0" * 16 + b"\0" * 12
    body += struct.pack("=IIIII", 0, 4, 128, 0, 4242)
    meminfo = struct.pack("=9I", 0, 131072, 0, 16384, 0, 0, 0, 0, 77)

    def parsed(attrs: bytes) -> int | None:
        (lst,), _ = sockdiag.parse_messages(_nlmsg(sockdiag.SOCK_DIAG_BY_FAMILY, body + attrs), "ipv4")
        return lst.drops

    assert parsed(_rtattr(1, b"\0" * 5) + _rtattr(sockdiag.INET_DIAG_SKMEMINFO, meminfo)) == 77
    assert parsed(_rtattr(sockdiag.INET_DIAG_SKMEMINFO, meminfo[:32])) is None  # too old: no drops slot
    assert parsed(struct.pack("=HH", 200, sockdiag.INET_DIAG_SKMEMINFO) + meminfo) is None  # overruns
    assert parsed(b"") is None


def _listen_drops_host() -> int:
    """TcpExt ListenDrops of this network namespace (what `nstat` shows): every listener's drops."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["ListenDrops"])


def _ss_drops(port: int) -> int:
    out = subprocess.run(["ss", "-Hltnem", "-4", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    (row,) = discovery.parse_ss_listeners(out, "ipv4")
    assert row.drops is not None, out
    return row.drops


def test_listen_drops_on_a_real_overflow() -> None:
    """A listener with backlog 1 that never accepts, and 20 clients: the accept queue holds 2, every
    other SYN is dropped (and each retransmit again). sock_diag's sk_drops counts them, agrees with
    `ss -ltnm` (whose output discovery parses too) and with the namespace's ListenDrops increase."""
    if not shutil.which("ss"):
        pytest.skip("iproute2's ss is not installed")
    n = 20
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port, inode = srv.getsockname()[1], _inode(srv)
        assert _find(inode).drops == 0
        host_before = _listen_drops_host()
        clients = []
        try:
            for _ in range(n):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))
                clients.append(c)
            deadline = time.monotonic() + 5
            while (_find(inode).drops or 0) < n - 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            ss_before = _ss_drops(port)
            ours = _find(inode).drops
            depths = discovery.read_listen_depths(os.getpid(), [inode])
            ss_after = _ss_drops(port)
            host_after = _listen_drops_host()
        finally:
            for c in clients:
                c.close()
    assert ours is not None and ours >= n - 2, ours
    # SYN retransmits may add drops between two reads; never fewer than ss saw before, nor more after.
    assert ss_before <= ours <= ss_after, (ss_before, ours, ss_after)
    assert ss_before <= depths.drops[inode] <= ss_after and depths[inode] == 2
    # Host-wide counter: other sockets of this namespace may drop too, never fewer than ours.
    assert host_after - host_before >= ours
