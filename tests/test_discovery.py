"""discovery: real processes, real sockets (no root needed), plus /proc/net/tcp parsing."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psutil
import pytest

from accept_watch.daemon import discovery, proctree
from accept_watch.daemon.discovery import DiscoveryError

# Children exit by themselves when their parent is gone (no orphans if a test dies); the parent
# prints one line "key=value ..." once everything is listening.
_PRELUDE = """
import os, signal, socket, sys, time
def linger(parent):
    while os.getppid() == parent:
        time.sleep(0.05)
    os._exit(0)
def fork_child(body):
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            linger(parent)
    return pid
"""

SHARED = _PRELUDE + """
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(16)
def grandparent_child():
    fork_child(lambda: None)  # a grandchild: inherits the socket too
a = fork_child(lambda: None)
b = fork_child(grandparent_child)
time.sleep(0.3)
print(f"port={s.getsockname()[1]} inode={os.fstat(s.fileno()).st_ino} kids={a},{b}", flush=True)
time.sleep(120)
"""

REUSEPORT = _PRELUDE + """
reserve = socket.socket()
reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
reserve.bind(("127.0.0.1", 0))
port = reserve.getsockname()[1]
master_listens = sys.argv[1] == "1"
if master_listens:  # nginx style: the master holds a listener of the group too
    own = socket.socket()
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    own.bind(("127.0.0.1", port))
    own.listen(8)
r, w = os.pipe()
def child():
    reserve.close()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(8)
    os.write(w, b"%d\\n" % os.fstat(s.fileno()).st_ino)
    linger(os.getppid())
a = fork_child(child)
b = fork_child(child)
from_kids = os.fdopen(r)
inodes = [int(from_kids.readline()) for _ in range(2)]
reserve.close()
print(f"port={port} kids={a},{b} inodes={inodes[0]},{inodes[1]}", flush=True)
time.sleep(120)
"""

NO_LISTENER = "import time; time.sleep(120)"

SIGNAL_FORK = _PRELUDE + """
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
kids = [fork_child(lambda: None)]
def more(*_):
    kids.append(fork_child(lambda: None))
    print(f"new={kids[-1]}", flush=True)
signal.signal(signal.SIGUSR1, more)
print(f"port={s.getsockname()[1]} kids={kids[0]}", flush=True)
while True:
    time.sleep(0.1)
"""


class Spawned:
    def __init__(self, proc: subprocess.Popen[str], info: dict[str, str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.info = info

    def ints(self, key: str) -> list[int]:
        return [int(x) for x in self.info[key].split(",")]

    def readline(self, timeout: float = 10.0) -> str:
        return _readline(self.proc, timeout)


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """A line from the child's stdout, or fail the test (never hang it)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from the test server within {timeout} s"
    return proc.stdout.readline().strip()


@contextmanager
def spawn(script: str, *args: str, wait_line: bool = True) -> Iterator[Spawned]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        info: dict[str, str] = {}
        if wait_line:
            line = _readline(proc, 10.0)
            assert line, f"test server exited early (rc={proc.poll()})"
            info = dict(kv.split("=", 1) for kv in line.split())
        yield Spawned(proc, info)
    finally:
        # Our own session: the group holds only the processes this test started.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_for(pred, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------
# /proc/net/tcp parsing
# ---------------------------------------------------------------------------------------------------
little = pytest.mark.skipif(sys.byteorder != "little", reason="hex samples are from a little-endian host")


@little
@pytest.mark.parametrize(
    ("hex_addr", "expected"),
    [
        ("0100007F", "127.0.0.1"),
        ("00000000", "0.0.0.0"),
        ("0101A8C0", "192.168.1.1"),
        ("00000000000000000000000000000000", "::"),
        ("00000000000000000000000001000000", "::1"),
        ("0000000000000000FFFF00000100007F", "::ffff:127.0.0.1"),
        ("B80D0120000000000000000001000000", "2001:db8::1"),
    ],
)
def test_decode_address(hex_addr: str, expected: str) -> None:
    assert discovery.decode_address(hex_addr) == expected


def test_decode_address_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="bad /proc/net/tcp address"):
        discovery.decode_address("123")


@little
def test_parse_proc_net_tcp_rows() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F40 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 4242 1 "
        "0000000000000000 100 0 0 10 0\n"
        "   1: 0100007F:1F40 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 "
        "0000000000000000 20 4 30 10 -1\n"
    )
    rows = discovery.parse_proc_net_tcp(text, "ipv4")
    assert [(r.address, r.port, r.state, r.rx_queue, r.inode) for r in rows] == [
        ("127.0.0.1", 8000, 0x0A, 3, 4242),
        ("127.0.0.1", 8000, 0x01, 0, 4243),
    ]


def test_parse_matches_the_real_kernel() -> None:
    """Our parser on this host's own /proc, against what the socket API says."""
    v4 = socket.socket()
    v4.bind(("127.0.0.2", 0))
    v4.listen(3)
    v6 = socket.socket(socket.AF_INET6)
    v6.bind(("::1", 0))
    v6.listen(3)
    try:
        with open("/proc/self/net/tcp") as f:
            rows4 = discovery.parse_proc_net_tcp(f.read(), "ipv4")
        with open("/proc/self/net/tcp6") as f:
            rows6 = discovery.parse_proc_net_tcp(f.read(), "ipv6")
        by_inode = {r.inode: r for r in rows4 + rows6}
        r4 = by_inode[os.fstat(v4.fileno()).st_ino]
        r6 = by_inode[os.fstat(v6.fileno()).st_ino]
        assert (r4.family, r4.address, r4.port, r4.state) == ("ipv4", "127.0.0.2", v4.getsockname()[1], 0x0A)
        assert (r6.family, r6.address, r6.port, r6.state) == ("ipv6", "::1", v6.getsockname()[1], 0x0A)
    finally:
        v4.close()
        v6.close()


# ---------------------------------------------------------------------------------------------------
# discover() on real processes
# ---------------------------------------------------------------------------------------------------
def test_shared_socket_inherited_by_children_and_grandchild() -> None:
    with spawn(SHARED) as srv:
        a, b = srv.ints("kids")
        grandchildren = [c.pid for c in psutil.Process(b).children()]
        assert len(grandchildren) == 1
        topo = discovery.discover(srv.pid)

        assert topo.master_pid == srv.pid
        assert set(topo.processes) == {srv.pid, a, b, *grandchildren}
        assert topo.processes[srv.pid].role == "master"
        assert {p.role for pid, p in topo.processes.items() if pid != srv.pid} == {"worker"}
        assert topo.processes[grandchildren[0]].ppid == b
        assert "-c" in topo.master_cmdline

        assert len(topo.listeners) == 1
        lst = topo.listeners[0]
        assert lst.inode == int(srv.info["inode"])
        assert (lst.family, lst.address, lst.port) == ("ipv4", "127.0.0.1", int(srv.info["port"]))
        assert lst.pids == sorted([srv.pid, a, b, *grandchildren])
        assert lst.mode == "shared"
        assert topo.ports == [int(srv.info["port"])]
        assert topo.worker_pids == sorted([a, b, *grandchildren])


def test_reuseport_group_one_socket_per_worker() -> None:
    with spawn(REUSEPORT, "0") as srv:
        a, b = srv.ints("kids")
        topo = discovery.discover(srv.pid)
        port = int(srv.info["port"])
        assert {lst.inode for lst in topo.listeners} == set(srv.ints("inodes"))
        assert sorted(tuple(lst.pids) for lst in topo.listeners) == [(a,), (b,)]
        modes = {(lst.address, lst.port, lst.mode) for lst in topo.listeners}
        assert modes == {("127.0.0.1", port, "reuseport")}


def test_reuseport_with_master_holding_its_own_listener() -> None:
    """nginx style: a listener held by master and workers is still part of a reuseport group."""
    with spawn(REUSEPORT, "1") as srv:
        a, b = srv.ints("kids")
        topo = discovery.discover(srv.pid)
        assert len(topo.listeners) == 3
        assert {lst.mode for lst in topo.listeners} == {"reuseport"}
        pid_sets = sorted(tuple(lst.pids) for lst in topo.listeners)
        assert pid_sets == sorted([(a,), (b,), tuple(sorted([srv.pid, a, b]))])


def test_single_ipv6_listeners() -> None:
    script = """
import socket, time
s1 = socket.socket(socket.AF_INET6); s1.bind(("::1", 0)); s1.listen(4)
s2 = socket.socket(socket.AF_INET6); s2.bind(("::", 0)); s2.listen(4)
print(f"p1={s1.getsockname()[1]} p2={s2.getsockname()[1]}", flush=True)
time.sleep(120)
"""
    with spawn(script) as srv:
        topo = discovery.discover(srv.pid)
        got = {(lst.family, lst.address, lst.port, lst.mode, tuple(lst.pids)) for lst in topo.listeners}
        assert got == {
            ("ipv6", "::1", int(srv.info["p1"]), "single", (srv.pid,)),
            ("ipv6", "::", int(srv.info["p2"]), "single", (srv.pid,)),
        }


def test_no_such_pid() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1  # above pid_max: can never exist
    with pytest.raises(DiscoveryError) as exc:
        discovery.discover(pid)
    assert str(exc.value) == f"no process with pid {pid}"
    with pytest.raises(DiscoveryError, match="no process with pid 0"):
        discovery.discover(0)
    with pytest.raises(DiscoveryError, match=f"no process with pid {pid}"):
        discovery.read_listen_depths(pid, [1])


def test_process_without_listener() -> None:
    with spawn(NO_LISTENER, wait_line=False) as srv:
        _wait_for(lambda: "time.sleep" in " ".join(psutil.Process(srv.pid).cmdline()))
        cmdline = " ".join(psutil.Process(srv.pid).cmdline())
        with pytest.raises(DiscoveryError) as exc:
            discovery.discover(srv.pid)
    msg = str(exc.value)
    tail = ") and its 0 descendants hold no listening TCP socket"
    assert msg.startswith(f"pid {srv.pid} (")
    assert msg.endswith(tail)
    # The command line is shown whole or cut with "..." (its length depends on where the venv lives).
    shown = msg[len(f"pid {srv.pid} (") : -len(tail)]
    assert shown == cmdline or (shown.endswith("...") and cmdline.startswith(shown[:-3]))
    assert "\n" not in msg


# As root, "(run as root)" would be no help: the message names the likely causes instead.
_DENIED_TAIL = (r"although running as root: the kernel refuses it .*$" if os.geteuid() == 0
                else r"\(run as root\)$")


def test_access_denied_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(pid: int) -> psutil.Process:
        raise psutil.AccessDenied(pid)

    monkeypatch.setattr(proctree.psutil, "Process", denied)
    with pytest.raises(DiscoveryError, match=r"^access denied to pid 4242 " + _DENIED_TAIL):
        discovery.discover(4242)


def test_fd_table_permission_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def listdir(path: str) -> list[str]:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(proctree.os, "listdir", listdir)
    with pytest.raises(DiscoveryError, match=r"^access denied reading /proc/77/fd " + _DENIED_TAIL):
        discovery.socket_inodes(77)


def test_refresh_sees_workers_come_and_go() -> None:
    with spawn(SIGNAL_FORK) as srv:
        (first,) = srv.ints("kids")
        topo = discovery.discover(srv.pid)
        assert set(topo.processes) == {srv.pid, first}

        os.kill(srv.pid, signal.SIGUSR1)
        new = int(srv.readline().split("=")[1])
        fresh = discovery.refresh(topo)
        assert set(fresh.processes) == {srv.pid, first, new}
        assert fresh.listeners[0].pids == sorted([srv.pid, first, new])

        os.kill(first, signal.SIGKILL)
        gone = _wait_for(lambda: first not in discovery.refresh(topo).processes)
        assert gone
        assert discovery.refresh(topo).listeners[0].pids == sorted([srv.pid, new])

    with pytest.raises(DiscoveryError, match=f"no process with pid {srv.pid}"):
        discovery.refresh(topo)


def test_lookup_process() -> None:
    me = discovery.lookup_process(os.getpid())
    assert me is not None
    assert (me.pid, me.ppid, me.role) == (os.getpid(), os.getppid(), "worker")
    assert me.create_time == pytest.approx(psutil.Process().create_time())
    with open("/proc/sys/kernel/pid_max") as f:
        assert discovery.lookup_process(int(f.read()) + 1) is None


# ---------------------------------------------------------------------------------------------------
# Accept-queue depth
# ---------------------------------------------------------------------------------------------------
def test_listen_depth_counts_unaccepted_connections() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    inode = os.fstat(listener.fileno()).st_ino
    clients: list[socket.socket] = []
    try:
        assert discovery.read_listen_depths(os.getpid(), [inode]) == {inode: 0}
        for _ in range(3):
            c = socket.create_connection(listener.getsockname(), timeout=5)
            clients.append(c)
        depth = _wait_for(lambda: discovery.read_listen_depths(os.getpid(), [inode]).get(inode) == 3, 2.0)
        assert depth, discovery.read_listen_depths(os.getpid(), [inode])
        conn, _ = listener.accept()
        conn.close()
        assert discovery.read_listen_depths(os.getpid(), [inode]) == {inode: 2}
        # Only the asked-for inodes, and a non-listening one is absent rather than 0.
        assert discovery.read_listen_depths(os.getpid(), []) == {}
        assert discovery.read_listen_depths(os.getpid(), [os.fstat(clients[0].fileno()).st_ino]) == {}
    finally:
        for c in clients:
            c.close()
        listener.close()


def test_zombie_master_is_reported_as_exited() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert _wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
        with pytest.raises(DiscoveryError, match=f"^pid {proc.pid} has exited"):
            discovery.discover(proc.pid)
    finally:
        proc.wait(timeout=10)


def test_real_gunicorn(tmp_path) -> None:
    """The case the tool exists for: a gunicorn master and its workers share one socket."""
    (tmp_path / "app.py").write_text(
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [])\n"
        "    return [b'ok']\n"
    )
    cmd = [sys.executable, "-m", "gunicorn", "--chdir", str(tmp_path), "--workers", "3", "--bind",
           "127.0.0.1:0", "--log-level", "warning", "app:app"]
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        def ready() -> discovery.Topology | None:
            try:
                topo = discovery.discover(proc.pid)
            except DiscoveryError:
                return None
            listeners_ok = topo.listeners and len(topo.listeners[0].pids) == 4
            return topo if len(topo.worker_pids) == 3 and listeners_ok else None

        topo = _wait_for(ready, 20)
        assert topo, "gunicorn did not start 3 workers"
        workers = {c.pid for c in psutil.Process(proc.pid).children()}
        assert set(topo.worker_pids) == workers
        assert len(topo.listeners) == 1
        lst = topo.listeners[0]
        assert (lst.address, lst.mode, lst.pids) == ("127.0.0.1", "shared", sorted([proc.pid, *workers]))
        assert {c.laddr.port for c in psutil.Process(proc.pid).net_connections("tcp")} == {lst.port}
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_parse_ss_listeners() -> None:
    from accept_watch.daemon.discovery import parse_ss_listeners

    v4 = ("LISTEN 3      2048   127.0.0.1:46047 0.0.0.0:* ino:22096841 sk:3735 cgroup:/ <->\n"
          "LISTEN 0      511    *:80 *:* ino:17 sk:1 <->\n")
    rows = parse_ss_listeners(v4, "ipv4")
    assert [(r.address, r.port, r.rx_queue, r.inode) for r in rows] == [
        ("127.0.0.1", 46047, 3, 22096841), ("0.0.0.0", 80, 0, 17)]
    v6 = ("LISTEN 1 128 [::1]:8000 [::]:* ino:99 sk:2 <->\n"
          "LISTEN 0 5 [fe80::1]%eth0:22 [::]:* ino:5 sk:3 <->\n")
    assert [(r.family, r.address, r.port) for r in parse_ss_listeners(v6, "ipv6")] == [
        ("ipv6", "::1", 8000), ("ipv6", "fe80::1", 22)]
