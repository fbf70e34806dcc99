"""Plain data that leaves the kernel-facing layer: what the probes hand to the daemon.

Nothing here imports bcc. Enum values are shared with the BPF C through generated #defines
(see probes/defines.py), so C and Python cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass


class ProbeKind(enum.StrEnum):
    """How accepts are hooked. Tried in this order by --probe auto."""

    FEXIT = "fexit"  # fexit on inet_csk_accept: BTF-typed, cheapest, sees the listener argument
    KRETPROBE = "kretprobe"  # kretprobe on inet_csk_accept: needs CONFIG_KPROBES
    TRACEPOINT = "tracepoint"  # syscalls:sys_exit_accept{,4}: works everywhere tracepoints do


PROBE_ORDER: tuple[ProbeKind, ...] = (ProbeKind.FEXIT, ProbeKind.KRETPROBE, ProbeKind.TRACEPOINT)


class EventSource(enum.IntEnum):
    """Which hook produced one accept record (an event's `source`)."""

    FEXIT = 1
    KRETPROBE = 2
    SYSCALL_EXIT = 3  # the accept syscall's exit tracepoint (primary path, or backstop for the others)


class DiagCounter(enum.IntEnum):
    """Slots of the BPF `diag` array: every way a record can be lost or degraded is counted."""

    EVENTS_LOST = 0  # ring buffer full: a per-connection event was not delivered (counters still exact)
    STATS_MAP_FULL = 1  # worker stats map full: an accept could not be counted (a real loss)
    HIST_MAP_FULL = 2  # queue-wait histogram map full: a wait sample was dropped
    FD_WALK_FAILED = 3  # accept returned an fd we could not resolve to a socket (a real loss)
    # The listening socket was not found: an accept() blocked before attach where the listening fd is
    # stashed at sys_enter (kernels < 5.15), or an io_uring accept seen by the kretprobe.
    LISTENER_UNKNOWN = 4
    # accepted socket whose queue-entry stamp is not plausible (in the future): no queue wait
    WAIT_UNKNOWN = 5
    NON_INET = 6  # accept of a non-IPv4/IPv6 socket by a tracked process (ignored, e.g. unix sockets)
    BACKSTOP_ACCEPTS = 7  # accepts the syscall-exit backstop counted because fexit/kretprobe missed them
    TRACKED_MAP_FULL = 8  # a forked child could not be added to the tracked set
    TRANSITIONS_MAP_FULL = 9  # the accept-sequence transition map was full
    CONNS_MAP_FULL = 10  # connection map full: a connection's queue wait or in-flight time not followed
    # Listener map full (more listening sockets than MAX_LISTENERS): an accept not counted per listener
    # (its worker count stays exact; the listener's accepts, queue depth and accept sequence miss it).
    LISTENERS_MAP_FULL = 11
    # Not a loss: fexit/kretprobe took a connection whose handshake was still being finished on another
    # CPU (queued, not yet stamped); its queue wait (microseconds at most) is counted as 0.
    WAIT_IN_HANDSHAKE = 12


DIAG_SLOTS = len(DiagCounter)


# Counters that mean a connection was not attributed at all (exactness is broken if > 0).
LOSS_COUNTERS: tuple[DiagCounter, ...] = (DiagCounter.STATS_MAP_FULL, DiagCounter.FD_WALK_FAILED)

# Counters that mean a figure other than the per-worker counts is incomplete: shown whenever non-zero
# (terminal, report), with what is missing. Keyed by the document's diagnostics names.
DEGRADED: dict[str, str] = {
    DiagCounter.LISTENERS_MAP_FULL.name.lower():
        "accepts missing from per-listener figures (listener map full)",
    DiagCounter.HIST_MAP_FULL.name.lower(): "queue-wait samples missing from the histograms (map full)",
    DiagCounter.TRANSITIONS_MAP_FULL.name.lower(): "accepts missing from the accept sequence (map full)",
    DiagCounter.CONNS_MAP_FULL.name.lower(): "connections without queue wait / in-flight time (map full)",
    DiagCounter.TRACKED_MAP_FULL.name.lower(): "forked processes not followed in the kernel (map full)",
}


def degraded_lines(diagnostics: object) -> list[str]:
    """One line per non-zero DEGRADED counter of a document's diagnostics."""
    if not isinstance(diagnostics, dict):
        return []
    out = []
    for name, meaning in DEGRADED.items():
        n = diagnostics.get(name)
        if isinstance(n, int) and n > 0:
            out.append(f"{name} {n:,}: {meaning}")
    return out


@dataclass(frozen=True, slots=True)
class WorkerCounters:
    """Exact in-kernel counters for one (worker process, listening port)."""

    pid: int
    port: int
    accepts: int
    first_ns: int  # CLOCK_MONOTONIC ns of the first accept seen
    last_ns: int
    wait_count: int  # accepts with a known queue wait
    wait_sum_ns: int
    wait_max_ns: int
    backstop_accepts: int = 0  # of `accepts`, how many the syscall-exit backstop counted
    inflight: int = 0  # accepted, not yet closed by the worker
    inflight_max: int = 0
    busy_accepts: int = 0  # accepts made while already holding an open connection
    closed: int = 0
    life_sum_ns: int = 0  # accept -> close, summed over `closed`
    life_max_ns: int = 0
    # The port's accept sequence number (its accepts counted from attach) at this worker's first and
    # last accept; 0: unknown (a source without it).
    first_seq: int = 0
    last_seq: int = 0


@dataclass(frozen=True, slots=True)
class ListenerCounters:
    """One listening socket (by inode), as seen at accept time."""

    inode: int
    port: int
    accepts: int
    depth_max: int  # highest sk_ack_backlog seen at an accept since attach
    backlog_limit: int  # sk_max_ack_backlog


@dataclass(frozen=True, slots=True)
class KernelSnapshot:
    """One periodic read of the BPF maps."""

    taken_ns: int  # CLOCK_MONOTONIC ns when read
    workers: tuple[WorkerCounters, ...]
    # (pid, port) -> {bucket index -> count}; bucket scheme in probes/histogram.py
    wait_hist: dict[tuple[int, int], dict[int, int]]
    listeners: tuple[ListenerCounters, ...]
    # (port, previous pid, pid) -> count: which worker's accept followed which, per port
    transitions: dict[tuple[int, int, int], int]
    diag: dict[DiagCounter, int]

    @property
    def lost_events(self) -> int:
        return self.diag.get(DiagCounter.EVENTS_LOST, 0)

    @property
    def unattributed(self) -> int:
        return sum(self.diag.get(c, 0) for c in LOSS_COUNTERS)

    def restricted(self, keep: Callable[[int, int], bool],
                   keep_listener: Callable[[ListenerCounters], bool]) -> KernelSnapshot:
        """The part of this read that `keep(pid, port)` and `keep_listener` select. The in-kernel
        loss counters are one set for all maps and stay whole."""
        return dataclasses.replace(
            self,
            workers=tuple(w for w in self.workers if keep(w.pid, w.port)),
            wait_hist={k: v for k, v in self.wait_hist.items() if keep(k[0], k[1])},
            listeners=tuple(lst for lst in self.listeners if keep_listener(lst)),
            transitions={k: v for k, v in self.transitions.items() if keep(k[2], k[0])},
        )


@dataclass(frozen=True, slots=True)
class AcceptEvent:
    """One accepted connection (only with the per-connection stream on, e.g. --events)."""

    ts_ns: int  # CLOCK_MONOTONIC ns at accept return
    pid: int
    tid: int
    comm: str
    family: int  # socket.AF_INET or socket.AF_INET6
    local_addr: str
    local_port: int
    peer_addr: str
    peer_port: int
    queue_wait_ns: int | None  # None when the SYN_RECV->ESTABLISHED transition was not seen
    backlog: int | None  # listener queue depth after this accept; None when the listener is unknown
    backlog_limit: int | None
    listener_inode: int | None
    source: EventSource
