"""The one kernel-facing module: compiles probes/accept_watch.c with BCC, attaches it, reads its maps.

bcc is imported lazily here and nowhere else; everything leaving this module is a plain dataclass
from probes/records.py. Attach strategy (--probe auto): fexit, then kretprobe, then the accept
syscall tracepoints, each tried for real (a feature flag such as BPF.support_kfunc() can say yes
where loading still fails). The syscall tracepoints are always attached: in tracepoint mode they
are the primary hook, otherwise the backstop for accepts the primary hook cannot see.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from . import defines, environment
from .compilermem import (  # noqa: F401 - compiler_mappings: tests
    compiler_mappings,
    fix_mmap_threshold,
    release_compiler_memory,
)
from .eventring import EventRing, decode_event  # noqa: F401 - decode_event: kept importable here

if TYPE_CHECKING:
    from .offsets import KernelLayout
from .records import (
    PROBE_ORDER,
    DiagCounter,
    KernelSnapshot,
    ListenerCounters,
    ProbeKind,
    WorkerCounters,
)

# KRETFUNC_PROBE's function name: BCC 0.26 (Debian 12) writes kretfunc__<fn>; later BCC (0.31 in Debian 13),
# which can attach to module functions, kretfunc__<module>__<fn>. The compiled object has one of them.
FEXIT_FNS = (b"kretfunc__vmlinux__inet_csk_accept", b"kretfunc__inet_csk_accept")
KRETPROBE_FN = b"kretprobe__inet_csk_accept"
# Attached in every mode.
# accept and accept4 share one program per direction (their records agree on the fields it reads).
TRACEPOINT_FNS: dict[str, bytes] = {
    "syscalls:sys_exit_accept": b"tracepoint__syscalls__sys_exit_accept4",
    "syscalls:sys_exit_accept4": b"tracepoint__syscalls__sys_exit_accept4",
    "sched:sched_process_fork": b"tracepoint__sched__sched_process_fork",
    "sched:sched_process_exit": b"tracepoint__sched__sched_process_exit",
}
# The listening-fd stash: attached where the syscall exit cannot read the fd from the saved
# registers (KernelLayout.listener_from_regs false), and for the kretprobe, which needs the stash.
ENTER_TRACEPOINT_FNS: dict[str, bytes] = {
    "syscalls:sys_enter_accept": b"tracepoint__syscalls__sys_enter_accept4",
    "syscalls:sys_enter_accept4": b"tracepoint__syscalls__sys_enter_accept4",
}
# Raw tracepoints: the program gets the tracepoint's arguments, no trace record is built.
RAW_TRACEPOINT_FNS: dict[str, bytes] = {
    "inet_sock_set_state": b"raw_tracepoint__inet_sock_set_state",
}
# Enough kretprobe instances for every worker blocked in accept() at once; a miss would still be
# caught by the syscall-exit backstop, but then counted as a backstop accept.
KRETPROBE_MAXACTIVE = 4096


class ProbeError(Exception):
    """A one-line reason the probes could not be compiled or attached."""


@dataclass(frozen=True)
class AttachAttempt:
    kind: ProbeKind
    ok: bool
    error: str | None = None


@dataclass
class AttachResult:
    kind: ProbeKind
    detail: str
    attempts: list[AttachAttempt] = field(default_factory=list)
    compile_s: float = 0.0
    attach_s: float = 0.0


def bpf_source() -> str:
    return resources.files(__package__).joinpath("accept_watch.c").read_text()


def generate_program(layout: KernelLayout, with_kretprobe: bool = True) -> str:
    """The full BPF C text: generated #defines, then the shipped program. with_kretprobe: compile
    the kretprobe's program too (left out where no kprobe can be created: it would never run)."""
    values = defines.generated_defines(layout.define_values())
    values["WITH_KRETPROBE"] = int(with_kretprobe)
    return defines.render(values) + "\n" + bpf_source()


def _import_bcc() -> Any:
    from .bccimport import BccMissing, import_bcc  # Debian's python3-bpfcc, see bccimport

    try:
        return import_bcc()[0]
    except BccMissing as exc:
        raise ProbeError(f"{exc}; `accept-watch doctor` says how to fix it") from exc


def manual_attach_bpf(**kwargs: Any) -> Any:
    """A compiled bcc.BPF with nothing attached. BCC attaches kretfunc__/kretprobe__/tracepoint__
    functions as soon as the object is built and raises if one fails; we attach ourselves, hook by
    hook, to fall back and to choose which hooks run."""
    bcc = _import_bcc()

    class _ManualAttachBPF(bcc.BPF):  # type: ignore[misc, name-defined]
        def _trace_autoload(self) -> None:
            return None

    return _ManualAttachBPF(**kwargs)


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what libbcc prints on fd 2 during an attempt, to report it as the attempt's reason."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.extend(line for line in tmp.read().decode(errors="replace").splitlines() if line.strip())


def _reason(exc: BaseException, noise: list[str]) -> str:
    """BCC's exception text plus what the kernel said (libbcc prints the errno on stderr).

    BCC turns EPERM into "Need super-user privileges" even for root; the kernel's own word
    ("Operation not permitted") is the useful part, e.g. fentry refused under lockdown."""
    text = str(exc).strip() or type(exc).__name__
    kernel_said = [n.strip() for n in noise if "bpf:" in n or "open(" in n or "not permitted" in n]
    if "super-user" in text and os.geteuid() == 0:
        text = "the kernel refused to load the program although we are root"
    if kernel_said and kernel_said[0] not in text:
        text = f"{text} ({kernel_said[0]})"
    return text


def _worker(pid: int, port: int, per_cpu: Any, live: tuple[int, int, int]) -> WorkerCounters:
    """One worker's per-CPU counters summed (first seen: the earliest CPU's; 0 = none on that CPU)."""
    firsts = [c.first_ns for c in per_cpu if c.first_ns]
    first_seqs = [c.first_seq for c in per_cpu if c.first_seq]
    inflight, inflight_max, busy = live
    return WorkerCounters(
        pid=pid, port=port, accepts=sum(c.accepts for c in per_cpu), first_ns=min(firsts, default=0),
        last_ns=max(c.last_ns for c in per_cpu), wait_count=sum(c.wait_count for c in per_cpu),
        wait_sum_ns=sum(c.wait_sum_ns for c in per_cpu), wait_max_ns=max(c.wait_max_ns for c in per_cpu),
        backstop_accepts=sum(c.backstop for c in per_cpu), inflight=max(0, inflight),
        inflight_max=inflight_max, busy_accepts=busy, closed=sum(c.closed for c in per_cpu),
        life_sum_ns=sum(c.life_sum_ns for c in per_cpu), life_max_ns=max(c.life_max_ns for c in per_cpu),
        first_seq=min(first_seqs, default=0), last_seq=max(c.last_seq for c in per_cpu),
    )


def _int(value: Any) -> int:
    """A map key or value of a plain integer type: an int from a batch buffer (ctypes converts
    array items of simple types), a ctypes integer from BCC's own iteration."""
    return value if isinstance(value, int) else value.value


# What the kernel answers for a map type without batch operations: ENOTSUPP (524, kernel-internal,
# no errno name), EOPNOTSUPP, EINVAL.
BATCH_UNSUPPORTED = frozenset({524, errno.EOPNOTSUPP, errno.EINVAL})


class _TableReader:
    """Reads a whole BPF map with BPF_MAP_LOOKUP_BATCH (5.6+): one system call per BATCH entries
    into buffers allocated once, where BCC's items() makes two per entry (get-next-key, lookup)
    and its items_lookup_batch() allocates buffers for max_entries on every call. The per-worker
    histogram alone has hundreds of cells, read once a second while the server is busy."""

    BATCH = 256

    def __init__(self, name: bytes, table: Any) -> None:
        self.name = name.decode()
        self.table = table
        self.size = min(self.BATCH, table.max_entries)
        self.keys = (table.Key * self.size)()
        self.values = (table.Leaf * self.size)()
        self.batch_ok = True

    def items(self) -> Iterator[tuple[Any, Any]]:
        """(key, value) pairs; both are views into reused buffers: convert them before the next."""
        if not self.batch_ok:
            yield from self.table.items()
            return
        lib = _import_bcc().libbcc.lib
        token_in, token_out = ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        while True:
            count = ctypes.c_uint32(self.size)
            res = lib.bpf_lookup_batch(self.table.map_fd, None if first else ctypes.byref(token_in),
                                       ctypes.byref(token_out), ctypes.byref(self.keys),
                                       ctypes.byref(self.values), ctypes.byref(count))
            err = ctypes.get_errno()
            if res != 0 and err != errno.ENOENT and first and (count.value == 0 or err in BATCH_UNSUPPORTED):
                # Batch lookups unsupported here (before 5.6, or this map type: per-CPU arrays before
                # 5.13 answer ENOTSUPP and leave count as it was): entry by entry.
                self.batch_ok = False
                yield from self.table.items()
                return
            if res != 0 and err != errno.ENOENT:
                raise ProbeError(f"reading BPF map {self.name} failed: {os.strerror(err)}")
            for i in range(count.value):
                yield self.keys[i], self.values[i]
            if res != 0:  # ENOENT: the last entries came with this call
                return
            token_in.value = token_out.value
            first = False


class AcceptProbes:
    """Compile, attach, read. Use as a context manager so probes are always detached."""

    def __init__(self, layout: KernelLayout, emit_events: bool = False, inflight: bool = True,
                 kretprobe: bool | None = None) -> None:
        self.layout = layout
        self.emit_events = emit_events
        # Follow accepted connections to their close (in-flight, accept->close time): the one feature
        # that needs inet_sock_set_state, which fires ~10 times per connection machine-wide.
        self.inflight = inflight
        # The kretprobe's program: None = compiled unless this kernel certainly has no kprobes (the
        # attempt would be skipped anyway); True = always (tests verifier-load it without attaching).
        self.kprobes_missing = environment.kprobes_missing()
        self.with_kretprobe = self.kprobes_missing is None if kretprobe is None else kretprobe
        self.program = generate_program(layout, self.with_kretprobe)
        self._bpf: Any = None
        self.result: AttachResult | None = None
        self._readers: dict[bytes, _TableReader] = {}
        self._ring: EventRing | None = None
        self.compiler_mappings_advised = 0  # by the last compile(): see compilermem
        self.compile_s = 0.0
        self._compiling: threading.Thread | None = None
        self._compile_error: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def compile(self) -> float:
        """Compile the program (all hooks; nothing attached yet). Returns seconds taken."""
        started = time.monotonic()
        fix_mmap_threshold()
        try:
            with _captured_stderr() as noise:
                self._bpf = manual_attach_bpf(text=self.program.encode())
        except Exception as exc:
            detail = next((n for n in noise if "error:" in n), str(exc))
            raise ProbeError(f"BPF program failed to compile: {detail}") from exc
        self.compiler_mappings_advised = release_compiler_memory()
        self.compile_s = time.monotonic() - started
        return self.compile_s

    def compile_in_background(self) -> None:
        """compile() on a thread (libbcc runs with the GIL released), overlapping the caller's other
        startup work; attach() and close() wait for it, attach() raises its error. fd 2 is redirected
        meanwhile (_captured_stderr): the caller must not print to stderr until attach()."""
        def run() -> None:
            try:
                self.compile()
            except BaseException as exc:  # handed to the thread that attaches
                self._compile_error = exc

        self._compiling = threading.Thread(target=run, name="accept-watch-compile")
        self._compiling.start()

    def _wait_compiled(self) -> None:
        if self._compiling is not None:
            self._compiling.join()
            self._compiling = None
        error, self._compile_error = self._compile_error, None
        if error is not None:
            raise error

    def attach(self, probe: ProbeKind | None, pids: Iterable[int], ports: Iterable[int]) -> AttachResult:
        """Seed the tracked set, attach the tracepoints, then the primary hook (None = auto)."""
        self._wait_compiled()
        if self._bpf is None:
            self.compile()
        compile_s = self.compile_s
        started = time.monotonic()
        self.track(pids)
        self.watch_ports(ports)
        self._set_config(defines.ConfigSlot.EMIT_EVENTS, int(self.emit_events))
        self._set_config(defines.ConfigSlot.INFLIGHT, int(self.inflight))
        # Tracepoints first: from here on every accept of a tracked process is counted, whatever
        # happens to the attempts below.
        self._set_config(defines.ConfigSlot.PROBE_KIND, defines.PROBE_KIND_IDS[ProbeKind.TRACEPOINT])
        try:
            self._attach_tracepoints(TRACEPOINT_FNS)
            if not self.layout.listener_from_regs:
                self._attach_tracepoints(ENTER_TRACEPOINT_FNS)
            for tp, fn in (RAW_TRACEPOINT_FNS.items() if self.inflight else ()):
                self._attach_one("raw tracepoint", self._bpf.attach_raw_tracepoint, tp, fn)
        except ProbeError:
            self.close()
            raise

        order = PROBE_ORDER if probe is None else (probe,)
        attempts: list[AttachAttempt] = []
        for kind in order:
            # Before attaching: fexit/kretprobe must mark what they count from their first call, or
            # the syscall-exit program would count it again.
            self._set_config(defines.ConfigSlot.BACKSTOP, int(kind is not ProbeKind.TRACEPOINT))
            error = self._try_primary(kind)
            attempts.append(AttachAttempt(kind, error is None, error))
            if error is None:
                self._set_config(defines.ConfigSlot.PROBE_KIND, defines.PROBE_KIND_IDS[kind])
                self.result = AttachResult(kind, self._describe(kind), attempts, compile_s,
                                           time.monotonic() - started)
                return self.result
        self.close()
        tried = "; ".join(f"{a.kind}: {a.error}" for a in attempts)
        raise ProbeError(f"no probe could be attached ({tried})")

    def _attach_one(self, what: str, attach: Callable[..., Any], tp: str, fn: bytes) -> None:
        try:
            attach(tp=tp.encode(), fn_name=fn)
        except Exception as exc:
            raise ProbeError(f"cannot attach {what} {tp}: {exc}") from exc

    def _attach_tracepoints(self, fns: dict[str, bytes]) -> None:
        for tp, fn in fns.items():
            self._attach_one("tracepoint", self._bpf.attach_tracepoint, tp, fn)

    def _detach_tracepoints(self, tps: Iterable[str]) -> None:
        attached = [tp for tp in tps if tp.encode() in self._bpf.tracepoint_fds]
        for tp in attached:
            self._bpf.detach_tracepoint(tp=tp.encode())

    def _try_primary(self, kind: ProbeKind) -> str | None:
        if kind is ProbeKind.TRACEPOINT:
            return None  # already attached above
        if kind is ProbeKind.FEXIT and self.layout.accept_proto == "unknown":
            return "inet_csk_accept is not in the kernel's BTF"
        if kind is ProbeKind.KRETPROBE and self.kprobes_missing:
            return self.kprobes_missing  # certain to fail: skip the stash's attach and detach
        if kind is ProbeKind.KRETPROBE and not self.with_kretprobe:
            return "its program was not compiled (kretprobe=False)"
        # The kretprobe finds the listener only in sys_enter's stash: attach it first, so the
        # kretprobe's first accept already has it.
        stash = kind is ProbeKind.KRETPROBE and self.layout.listener_from_regs
        noise: list[str] = []
        try:
            if stash:
                self._attach_tracepoints(ENTER_TRACEPOINT_FNS)
            with _captured_stderr() as noise:
                if kind is ProbeKind.FEXIT:
                    self._bpf.attach_kretfunc(fn_name=self._fexit_fn())
                else:
                    self._bpf.attach_kretprobe(event=b"inet_csk_accept", fn_name=KRETPROBE_FN,
                                               maxactive=KRETPROBE_MAXACTIVE)
        except Exception as exc:
            if stash:
                with contextlib.suppress(Exception):  # those that did attach; the reason is below
                    self._detach_tracepoints(ENTER_TRACEPOINT_FNS)
            return str(exc) if isinstance(exc, ProbeError) else _reason(exc, noise)
        return None

    def _describe(self, kind: ProbeKind) -> str:
        off = "" if self.inflight else "; in-flight tracking off (--no-inflight)"
        if kind is ProbeKind.FEXIT:
            return f"fexit {self.layout.accept_proto_text}; syscall-exit tracepoints as backstop{off}"
        if kind is ProbeKind.KRETPROBE:
            return f"kretprobe inet_csk_accept (return value only); syscall-exit tracepoints as backstop{off}"
        return ("syscalls:sys_exit_accept/accept4 tracepoints, new fd resolved through the task's fd table; "
                + self.layout.syscall_arg1_text + off)

    def _fexit_fn(self) -> bytes:
        lib = _import_bcc().libbcc.lib
        return next((n for n in FEXIT_FNS if lib.bpf_function_start(self._bpf.module, n)), FEXIT_FNS[-1])

    def load_only(self, kind: ProbeKind) -> None:
        """Verifier-load one hook's program without attaching it (tests, doctor)."""
        bcc = _import_bcc()
        if self._bpf is None:
            self.compile()
        if kind is ProbeKind.FEXIT:
            self._bpf.load_func(self._fexit_fn(), bcc.BPF.TRACING)
        elif kind is ProbeKind.KRETPROBE:
            if not self.with_kretprobe:
                raise ProbeError("the kretprobe program was not compiled: AcceptProbes(kretprobe=True)")
            self._bpf.load_func(KRETPROBE_FN, bcc.BPF.KPROBE)
        else:
            for fn in {*TRACEPOINT_FNS.values(), *ENTER_TRACEPOINT_FNS.values()}:
                self._bpf.load_func(fn, bcc.BPF.TRACEPOINT)
            for fn in RAW_TRACEPOINT_FNS.values():
                self._bpf.load_func(fn, bcc.BPF.RAW_TRACEPOINT)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a compile still running owns _bpf until it ends
            self._wait_compiled()
        self._readers.clear()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> AcceptProbes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- configuration ---------------------------------------------------------------------------
    def _set_config(self, slot: defines.ConfigSlot, value: int) -> None:
        table = self._bpf[b"config"]
        table[ctypes.c_int(int(slot))] = ctypes.c_uint64(value)

    def track(self, pids: Iterable[int]) -> None:
        table = self._bpf[b"tracked"]
        for pid in pids:
            table[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    def seed_backstop(self, tids: Iterable[int]) -> None:
        """Threads inside accept() at attach: the backstop stays until each has left it."""
        table = self._bpf[b"backstop_pending"]
        for tid in tids:
            table[ctypes.c_uint32(tid)] = ctypes.c_uint8(1)

    def backstop_pending(self) -> set[int]:
        return {k.value for k in self._bpf[b"backstop_pending"].keys()}  # noqa: SIM118 - BCC tables

    def clear_backstop(self, tids: Iterable[int]) -> None:
        table = self._bpf[b"backstop_pending"]
        for tid in tids:
            with contextlib.suppress(KeyError):  # the kernel side may have removed it meanwhile
                del table[ctypes.c_uint32(tid)]

    def retire_backstop(self) -> None:
        """Switch the backstop off: the syscall-exit programs return at once, and fexit/kretprobe
        stop marking what they counted (one flag for both, so nothing is counted twice or missed).
        Switched off, not detached: detaching a syscall tracepoint re-patches the kernel's syscall
        exit path while the server runs; doing that under load panicked a 6.12 guest under QEMU
        (an int3 left in syscall_exit_to_user_mode_prepare), once in ~50 retirements."""
        self._set_config(defines.ConfigSlot.BACKSTOP, 0)

    def only_watched_ports(self, only: bool) -> None:
        """--port: count accepts on the watched ports only."""
        self._set_config(defines.ConfigSlot.ONLY_WATCHED_PORTS, int(only))

    def watch_ports(self, ports: Iterable[int]) -> None:
        table = self._bpf[b"watched_ports"]
        for port in ports:
            table[ctypes.c_int(port)] = ctypes.c_uint8(1)

    # -- reading ---------------------------------------------------------------------------------
    def _items(self, name: bytes) -> Iterator[tuple[Any, Any]]:
        reader = self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = _TableReader(name, self._bpf[name])
        return reader.items()

    def snapshot(self) -> KernelSnapshot:
        taken = time.monotonic_ns()
        live = {(k.tgid, k.port): (v.inflight, v.inflight_max, v.busy_accepts)
                for k, v in self._items(b"worker_live")}
        workers = tuple(_worker(k.tgid, k.port, per_cpu, live.get((k.tgid, k.port), (0, 0, 0)))
                        for k, per_cpu in self._items(b"worker_stats"))
        hist: dict[tuple[int, int], dict[int, int]] = {}
        for k, v in self._items(b"wait_hist"):
            hist.setdefault((k.tgid, k.port), {})[k.bucket] = _int(v)
        listeners = tuple(
            ListenerCounters(inode=_int(k), port=max(c.port for c in per_cpu),
                             accepts=sum(c.accepts for c in per_cpu),
                             depth_max=max(c.depth_max for c in per_cpu),
                             backlog_limit=max(c.backlog_limit for c in per_cpu))
            for k, per_cpu in self._items(b"listener_stats")
        )
        transitions = {(k.port, k.prev_tgid, k.tgid): _int(v) for k, v in self._items(b"transitions")}
        slots = {_int(k): sum(v) for k, v in self._items(b"diag")}
        diag = {c: slots.get(int(c), 0) for c in DiagCounter}
        return KernelSnapshot(taken, workers, hist, listeners, transitions, diag)

    def forget_workers(self, pids: Iterable[int]) -> int:
        """Delete exited workers' entries (counters, live counts, histogram cells, accept sequence), so
        a daemon running for weeks through --max-requests respawns never fills the maps (a full one
        would stop counting). Call only for pids whose counts are already folded away in user space.
        Returns the entries deleted."""
        gone = {int(p) for p in pids}
        if not gone:
            return 0
        deleted = 0
        for name in (b"worker_stats", b"worker_live", b"wait_hist", b"transitions"):
            table = self._bpf[name]
            doomed = [type(k).from_buffer_copy(k) for k, _ in self._items(name)
                      if k.tgid in gone or getattr(k, "prev_tgid", 0) in gone]
            for key in doomed:
                with contextlib.suppress(KeyError):
                    del table[key]
                    deleted += 1
        return deleted

    def forget_listeners(self, inodes: Iterable[int], ports: Iterable[int]) -> int:
        """Delete closed listeners' entries: per-listener counters (by socket inode) and the last
        acceptor of ports no watched server listens on any more. A daemon following restarts gets a new
        listening socket (a new inode) at each one; kept, they would fill the listener map and stop
        per-listener counting. Call only for listeners whose figures user space keeps (closed ones).
        Returns the entries deleted."""
        deleted = 0
        for name, keys in ((b"listener_stats", [ctypes.c_uint64(int(i)) for i in inodes]),
                           (b"last_acceptor", [ctypes.c_uint16(int(p)) for p in ports])):
            table = self._bpf[name]
            for key in keys:
                with contextlib.suppress(KeyError):
                    del table[key]
                    deleted += 1
        return deleted

    def tracked_pids(self) -> set[int]:
        return {k.value for k in self._bpf[b"tracked"].keys()}  # noqa: SIM118 - BCC tables

    def open_events(self) -> None:
        """Map the per-connection ring buffer; drain_events() then reads it in blocks."""
        table = self._bpf[b"events"]
        self._ring = EventRing(table.map_fd, defines.RINGBUF_PAGES * mmap.PAGESIZE)

    def drain_events(self) -> bytes:
        """Every record committed since the last call (eventring.STRIDE bytes each); b"" if none."""
        return self._ring.drain() if self._ring is not None else b""
