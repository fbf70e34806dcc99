"""Probe programs against the running kernel: verifier loads, attach fallback, --dry-run, --print-bpf."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from accept_watch.probes.records import PROBE_ORDER, ProbeKind

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("kernel_ok")]


@pytest.fixture(scope="module")
def layout():
    from accept_watch.probes.offsets import load_layout

    return load_layout()


def test_kretprobe_program_passes_the_verifier(layout) -> None:
    # CONFIG_KPROBES may be off (it is on our VMs): loading does not need it, attaching does.
    from accept_watch.probes.kernel import AcceptProbes

    with AcceptProbes(layout, kretprobe=True) as probes:  # compiled even where kprobes are missing
        probes.load_only(ProbeKind.KRETPROBE)


def test_tracepoint_programs_pass_the_verifier(layout) -> None:
    from accept_watch.probes.kernel import AcceptProbes

    with AcceptProbes(layout) as probes:
        probes.load_only(ProbeKind.TRACEPOINT)


def test_fexit_program_loads_or_is_refused_by_the_kernel_not_by_us(layout) -> None:
    """The fexit program is compiled for the kernel's own inet_csk_accept prototype; where the
    kernel refuses tracing programs (EPERM here) the refusal must come from the load syscall."""
    from accept_watch.probes.kernel import AcceptProbes

    assert layout.accept_proto in ("sk_arg", "sk_flags_err_kern")
    with AcceptProbes(layout) as probes:
        try:
            probes.load_only(ProbeKind.FEXIT)
        except Exception as exc:  # BCC raises plain Exception with the kernel's errno text
            text = str(exc)
            assert "super-user" in text or "not permitted" in text or "Permission" in text, text


def test_auto_picks_the_first_hook_that_really_attaches(layout) -> None:
    from accept_watch.probes.kernel import AcceptProbes, ProbeError

    forced = {}
    for kind in PROBE_ORDER:
        with AcceptProbes(layout) as probes:
            try:
                probes.attach(kind, pids=[], ports=[])
                forced[kind] = True
            except ProbeError:
                forced[kind] = False
    assert forced[ProbeKind.TRACEPOINT], "the tracepoint path must work wherever tracepoints do"
    expected = next(k for k in PROBE_ORDER if forced[k])
    with AcceptProbes(layout) as probes:
        result = probes.attach(None, pids=[], ports=[])
    assert result.kind is expected
    # Every hook tried before the chosen one failed for a stated reason.
    for attempt in result.attempts[:-1]:
        assert not attempt.ok and attempt.error
    assert result.attempts[-1].kind is expected and result.attempts[-1].ok


def test_program_uses_btf_offsets_not_headers(layout) -> None:
    from accept_watch.probes.kernel import generate_program

    program = generate_program(layout)
    for name, value in layout.defines.items():
        assert f"#define {name} {value}\n" in program
    body = re.sub(r"//[^\n]*", "", program.split("#include", 1)[1])  # code, not comments
    # No kernel struct is named, so none can be laid out by (possibly foreign) headers.
    kernel_structs = r"struct (sock|sock_common|socket|task_struct|file|files_struct|fdtable|inode)\b"
    assert not re.search(kernel_structs, body)


def test_doctor_reports_what_auto_would_use(layout) -> None:
    from accept_watch.probes.kernel import AcceptProbes
    from tests.watcher import run_cli

    with AcceptProbes(layout) as probes:
        chosen = probes.attach(None, pids=[], ports=[]).kind
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"auto would use +{chosen}\b", proc.stdout), proc.stdout
    for check in ("privileges", "BTF", "CONFIG_KPROBES", "kernel headers", "BCC", "probe fexit",
                  "probe kretprobe", "probe tracepoint", "ring buffer"):
        assert check in proc.stdout, check
    as_json = run_cli("doctor", "--json")
    names = {c["name"]: c for c in json.loads(as_json.stdout)}
    assert names["auto would use"]["ok"] and names["auto would use"]["detail"] == str(chosen)


def test_compiler_pages_are_given_back_after_compiling(layout) -> None:
    """After a compile, every libLLVM/libclang mapping is advised out (MADV_DONTNEED for clean
    read-only mappings, MADV_PAGEOUT for the rest; accepted by the kernel). How much then leaves RAM
    depends on the host (other processes mapping the same library), so that figure is measured by
    `make bench` (long run: compiler libraries resident), not asserted here."""
    from accept_watch.probes.kernel import AcceptProbes, compiler_mappings

    with AcceptProbes(layout) as probes:
        assert probes.compiler_mappings_advised == 0
        probes.compile()
        mappings = compiler_mappings()
        assert mappings, "libLLVM/libclang are not mapped: is BCC linked differently?"
        mapped_kib = sum(length for _, length in mappings) // 1024
        assert mapped_kib > 50_000  # the compiler really is there (~120 MB mapped)
        assert probes.compiler_mappings_advised == len(mappings)


@contextlib.contextmanager
def _watching_own_listener(layout) -> Iterator[tuple[socket.socket, int, Any]]:
    """A listening socket in this test process, with the tracepoint probes attached to this process
    and that port: (listener, port, AcceptProbes)."""
    from accept_watch.probes.kernel import AcceptProbes

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port = srv.getsockname()[1]
        with AcceptProbes(layout) as probes:
            probes.attach(ProbeKind.TRACEPOINT, pids=[os.getpid()], ports=[port])
            yield srv, port, probes


def test_batched_map_reads_equal_entry_by_entry_reads(layout, monkeypatch) -> None:
    """snapshot() reads maps with BPF_MAP_LOOKUP_BATCH; BCC's own iteration must see the same."""
    from accept_watch.probes import kernel

    monkeypatch.setattr(kernel._TableReader, "BATCH", 3)  # many calls per map: the chaining is tested
    n = 300
    with _watching_own_listener(layout) as (srv, port, probes):
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port)):
                conn, _ = srv.accept()
                conn.close()
        batched = probes.snapshot()
        for reader in probes._readers.values():
            reader.batch_ok = False
        one_by_one = probes.snapshot()
    assert next(w for w in batched.workers if w.pid == os.getpid()).accepts == n
    assert set(batched.workers) == set(one_by_one.workers)
    assert batched.wait_hist == one_by_one.wait_hist
    assert sum(batched.wait_hist[(os.getpid(), port)].values()) == n
    assert set(batched.listeners) == set(one_by_one.listeners)
    assert batched.transitions == one_by_one.transitions == {(port, os.getpid(), os.getpid()): n - 1}
    assert batched.diag == one_by_one.diag


def test_connection_map_empties_and_inflight_returns_to_zero(layout) -> None:
    """Every way a connection ends removes its entry from the `conns` map (a plain hash: a leak
    would fill it): the worker closes it, the peer resets it after accept, or the peer resets it
    while it waits in the accept queue. In-flight goes back to 0."""
    import struct
    import time

    def reset(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    with _watching_own_listener(layout) as (srv, port, probes):
        conns = probes._bpf[b"conns"]
        for _ in range(20):  # the worker closes first
            with socket.create_connection(("127.0.0.1", port)):
                conn, _ = srv.accept()
                conn.close()
        held = []
        for _ in range(10):  # accepted, then reset by the peer while the worker holds them
            client = socket.create_connection(("127.0.0.1", port))
            held.append(srv.accept()[0])
            reset(client)
        for _ in range(5):  # reset by the peer while still in the accept queue
            reset(socket.create_connection(("127.0.0.1", port)))
        time.sleep(0.1)
        mid = next(w for w in probes.snapshot().workers if w.pid == os.getpid())
        assert mid.accepts == 30 and mid.closed == 30 and mid.inflight == 0
        for _ in range(5):
            srv.accept()[0].close()  # dead on arrival: counted, not followed
        for conn in held:
            conn.close()
        time.sleep(0.1)
        end = next(w for w in probes.snapshot().workers if w.pid == os.getpid())
        left = len(list(conns.keys()))
    assert end.accepts == 35
    assert (end.closed, end.inflight) == (30, 0)
    assert left == 0, f"{left} connections left in the conns map"


@pytest.mark.parametrize("listener_from", ["saved registers", "sys_enter stash"])
def test_listener_of_each_accept_is_known_both_ways(layout, listener_from) -> None:
    """The accept syscall's exit finds the listening fd in the saved registers (5.15+, no sys_enter
    program attached) or in sys_enter's stash (older kernels: forced here). One thread accepting
    on two listeners in turn: each accept is counted under its own listener's inode."""
    import dataclasses

    from accept_watch.probes.kernel import ENTER_TRACEPOINT_FNS, AcceptProbes
    from accept_watch.probes.records import DiagCounter

    if listener_from == "saved registers":
        if not layout.listener_from_regs:
            pytest.skip(f"this kernel: {layout.syscall_arg1_text}")
    else:
        layout = dataclasses.replace(layout, syscall_arg1_off=-1, syscall_arg1_text="forced: stash")
    n = 40
    with socket.socket() as a, socket.socket() as b:
        for srv in (a, b):
            srv.bind(("127.0.0.1", 0))
            srv.listen(64)
        ports = [a.getsockname()[1], b.getsockname()[1]]
        with AcceptProbes(layout) as probes:
            probes.attach(ProbeKind.TRACEPOINT, pids=[os.getpid()], ports=ports)
            enter_attached = {tp.decode() for tp in probes._bpf.tracepoint_fds} & set(ENTER_TRACEPOINT_FNS)
            for i in range(2 * n):
                srv, port = (a, ports[0]) if i % 2 == 0 else (b, ports[1])
                with socket.create_connection(("127.0.0.1", port)):
                    srv.accept()[0].close()
            snap = probes.snapshot()
        inodes = {os.fstat(a.fileno()).st_ino: ports[0], os.fstat(b.fileno()).st_ino: ports[1]}
    assert bool(enter_attached) == (listener_from == "sys_enter stash"), enter_attached
    assert {lst.inode: (lst.port, lst.accepts) for lst in snap.listeners} == {
        ino: (port, n) for ino, port in inodes.items()
    }
    assert snap.diag[DiagCounter.LISTENER_UNKNOWN] == 0
    assert sum(w.accepts for w in snap.workers if w.pid == os.getpid()) == 2 * n


def test_backstop_pending_map_seeded_read_and_cleared(layout) -> None:
    """The map the backstop's retirement reads (its kernel side is proven by the kernel matrix's
    fexit-blocked path; here only tracepoints attach)."""
    with _watching_own_listener(layout) as (_srv, _port, probes):
        probes.seed_backstop([111, 222])
        assert probes.backstop_pending() == {111, 222}
        probes.clear_backstop([111, 333])  # 333 was never there: no error
        assert probes.backstop_pending() == {222}


def test_retiring_the_backstop_switches_it_off_without_detaching(layout) -> None:
    """Retirement only flips the BACKSTOP config slot (no live re-patching of the syscall path); in
    tracepoint mode, where the syscall exit is the primary hook, counting goes on."""
    import ctypes

    from accept_watch.probes import defines

    with _watching_own_listener(layout) as (srv, port, probes):
        before = set(probes._bpf.tracepoint_fds)
        probes.retire_backstop()
        after = set(probes._bpf.tracepoint_fds)
        slot = probes._bpf[b"config"][ctypes.c_int(int(defines.ConfigSlot.BACKSTOP))].value
        with socket.create_connection(("127.0.0.1", port)):
            srv.accept()[0].close()
        snap = probes.snapshot()
    assert after == before and b"syscalls:sys_exit_accept4" in after
    assert slot == 0
    assert next(w for w in snap.workers if w.pid == os.getpid()).accepts == 1


def test_event_ring_is_drained_in_blocks_across_wraparounds(layout, monkeypatch) -> None:
    """The ring buffer mapped by probes/eventring.py: a one-page ring (39 records) drained every 10
    connections wraps around many times; every record arrives once, in order, none lost."""
    from accept_watch.probes import defines
    from accept_watch.probes.eventring import STRIDE, decode_event
    from accept_watch.probes.kernel import AcceptProbes
    from accept_watch.probes.records import DiagCounter

    monkeypatch.setattr(defines, "RINGBUF_PAGES", 1)
    n, got = 200, []
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port, inode = srv.getsockname()[1], os.fstat(srv.fileno()).st_ino
        with AcceptProbes(layout, emit_events=True) as probes:
            probes.attach(ProbeKind.TRACEPOINT, pids=[os.getpid()], ports=[port])
            probes.open_events()
            assert probes._ring.size == 4096
            peers = []
            for i in range(n):
                with socket.create_connection(("127.0.0.1", port)) as client:
                    peers.append(client.getsockname()[1])
                    srv.accept()[0].close()
                if i % 10 == 9:
                    block = probes.drain_events()
                    assert len(block) == 10 * STRIDE
                    got += [decode_event(block[j + 8:j + STRIDE]) for j in range(0, len(block), STRIDE)]
            assert probes.drain_events() == b""
            snap = probes.snapshot()
    assert snap.diag[DiagCounter.EVENTS_LOST] == 0
    assert [e.peer_port for e in got] == peers
    assert {(e.pid, e.local_port, e.local_addr, e.family) for e in got} == {
        (os.getpid(), port, "127.0.0.1", socket.AF_INET)}
    assert all(e.listener_inode == inode and e.queue_wait_ns is not None for e in got)
    ts = [e.ts_ns for e in got]
    assert ts == sorted(ts)


def test_a_full_listener_map_is_counted_not_silent(layout, monkeypatch) -> None:
    """More listening sockets than the listener map holds (4096 in production, 2 here): accepts on
    the listener that did not fit are still counted per worker, and counted as listeners_map_full
    (issue 11: 104 of 4200 listeners showed 0 accepts and nothing said why)."""
    from accept_watch.probes import defines
    from accept_watch.probes.kernel import AcceptProbes
    from accept_watch.probes.records import DiagCounter, degraded_lines

    monkeypatch.setitem(defines.MAP_SIZES, "MAX_LISTENERS", 2)
    n = 5
    srvs = [socket.socket() for _ in range(3)]
    try:
        for srv in srvs:
            srv.bind(("127.0.0.1", 0))
            srv.listen(64)
        ports = [srv.getsockname()[1] for srv in srvs]
        with AcceptProbes(layout) as probes:
            assert "#define MAX_LISTENERS 2\n" in probes.program
            probes.attach(ProbeKind.TRACEPOINT, pids=[os.getpid()], ports=ports)
            for srv, port in zip(srvs, ports, strict=True):
                for _ in range(n):
                    with socket.create_connection(("127.0.0.1", port)):
                        srv.accept()[0].close()
            snap = probes.snapshot()
    finally:
        for srv in srvs:
            srv.close()
    assert sum(w.accepts for w in snap.workers if w.pid == os.getpid()) == 3 * n
    assert sorted(lst.port for lst in snap.listeners) == sorted(ports[:2])
    assert snap.diag[DiagCounter.LISTENERS_MAP_FULL] == n
    # the accept-sequence map is keyed by port and just as large: the third port's accepts are missing
    assert snap.diag[DiagCounter.TRANSITIONS_MAP_FULL] == n
    assert snap.unattributed == 0
    lines = degraded_lines({c.name.lower(): v for c, v in snap.diag.items()})
    assert any(line.startswith(f"listeners_map_full {n}:") for line in lines), lines


def test_counts_from_several_cpus_are_summed(layout) -> None:
    """worker_stats, listener_stats and diag are per-CPU maps: accepts made on CPU 0 and then on
    CPU 1 land in two copies, and the snapshot sums them (first seen = the earliest copy's)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    saved = os.sched_getaffinity(0)
    n = 30
    try:
        with _watching_own_listener(layout) as (srv, port, probes):
            for cpu in cpus[:2]:
                os.sched_setaffinity(0, {cpu})
                for _ in range(n):
                    with socket.create_connection(("127.0.0.1", port)):
                        srv.accept()[0].close()
            raw = probes._bpf[b"worker_stats"]
            per_cpu = next(v for k, v in raw.items() if k.tgid == os.getpid())
            snap = probes.snapshot()
    finally:
        os.sched_setaffinity(0, saved)
    assert sorted(c.accepts for c in per_cpu if c.accepts) == [n, n]
    (w,) = [w for w in snap.workers if w.pid == os.getpid()]
    assert (w.accepts, w.wait_count, w.closed) == (2 * n, 2 * n, 2 * n)
    assert w.first_ns == min(c.first_ns for c in per_cpu if c.first_ns) and w.last_ns >= w.first_ns
    # The port's accept sequence: 1..n on the first CPU, n+1..2n on the second (one accepting thread,
    # so no two accepts race for a number). First values are set where the entry was created (the
    # other CPU's copy keeps 0, like first_ns); the snapshot takes the earliest first, the latest last.
    assert sorted((c.first_seq, c.last_seq) for c in per_cpu if c.accepts) == [(0, 2 * n), (1, n)]
    assert (w.first_seq, w.last_seq) == (1, 2 * n)
    (lst,) = snap.listeners
    assert lst.accepts == 2 * n


def test_without_inflight_tracking_the_state_tracepoint_is_not_attached(layout) -> None:
    """--no-inflight: no inet_sock_set_state program, nothing in the connection map; counts and
    queue waits as usual (the wait comes from the child socket, not from the tracepoint)."""
    from accept_watch.probes.kernel import AcceptProbes

    n = 25
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port = srv.getsockname()[1]
        with AcceptProbes(layout, inflight=False) as probes:
            result = probes.attach(ProbeKind.TRACEPOINT, pids=[os.getpid()], ports=[port])
            raw_attached = dict(probes._bpf.raw_tracepoint_fds)
            held = []
            for _ in range(n):
                socket.create_connection(("127.0.0.1", port))
                held.append(srv.accept()[0])
            snap = probes.snapshot()
            conns = len(list(probes._bpf[b"conns"].keys()))
            for conn in held:
                conn.close()
    assert raw_attached == {}
    assert "in-flight tracking off" in result.detail
    (w,) = [w for w in snap.workers if w.pid == os.getpid()]
    assert (w.accepts, w.wait_count, w.inflight, w.inflight_max, w.closed) == (n, n, 0, 0, 0)
    assert conns == 0


@pytest.mark.parametrize(("stamp_at", "expected"), [("OFF_SK_V6_DADDR", "in handshake"),
                                                     ("OFF_SK_SOCKET", "unknown")])
def test_queue_wait_stamp_zero_or_implausible(layout, stamp_at, expected) -> None:
    """The queue-entry stamp read at accept, pointed at another field of the socket: 0 (an IPv4
    socket's IPv6 address), as when fexit takes a child before the softirq stamped it, counts the
    wait as 0 (wait_in_handshake); a kernel pointer read as µs lies in the future: unknown."""
    import dataclasses

    from accept_watch.probes.records import DiagCounter

    forced = dataclasses.replace(
        layout, defines={**layout.defines, "OFF_TCP_RCVQ_SPACE_TIME": layout.defines[stamp_at]})
    n = 10
    with _watching_own_listener(forced) as (srv, port, probes):
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port)):
                srv.accept()[0].close()
        snap = probes.snapshot()
    (w,) = [w for w in snap.workers if w.pid == os.getpid()]
    if expected == "in handshake":
        assert (snap.diag[DiagCounter.WAIT_IN_HANDSHAKE], snap.diag[DiagCounter.WAIT_UNKNOWN]) == (n, 0)
        assert (w.wait_count, w.wait_max_ns) == (n, 0)
    else:
        assert (snap.diag[DiagCounter.WAIT_IN_HANDSHAKE], snap.diag[DiagCounter.WAIT_UNKNOWN]) == (0, n)
        assert w.wait_count == 0
    assert w.accepts == n
