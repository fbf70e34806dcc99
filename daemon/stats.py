"""Aggregation: cumulative kernel counters in, the accept-watch/1 Document (daemon/document.py) out.

The kernel keeps exact cumulative counters per (pid, port); this module only sums, differentiates
and windows them. Everything it keeps is bounded however long it runs: time windows (rates, rate and
depth history), fixed-size deques (events), and per-pid records, of which at most max_exited exited
ones are kept (their accepts stay in the totals after eviction).

pids are reused (pid_max can be as low as 32768) and the kernel map is keyed by pid only, so a new
process with an old pid keeps counting on the old counter: when a pid's create_time changes, the old
process's counters become the new record's baseline and are subtracted (all but the wait maximum,
which cannot be un-mixed).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

import psutil

from accept_watch import __version__
from accept_watch.probes.eventring import decode_event, newest_events
from accept_watch.probes.histogram import bucket_bounds, percentile
from accept_watch.probes.records import LOSS_COUNTERS, AcceptEvent, DiagCounter, KernelSnapshot

from . import discovery, procident
from .clock import ClockMap, iso_utc
from .discovery import ProcessInfo, Topology
from .document import SCHEMA_ID, Document
from .export import event_to_dict
from .fairshare import ShareTracker
from .generations import Masters
from .listenerstate import ListenerTable
from .rates import RATE_WINDOWS_S, RateTracker

_NS = 1_000_000_000


@dataclass(slots=True)
class _Raw:
    """Kernel values for one pid summed over ports (cumulative since attach)."""

    accepts: int = 0
    wait_count: int = 0
    wait_sum_ns: int = 0
    wait_max_ns: int = 0
    first_ns: int = 0
    last_ns: int = 0
    hist: dict[int, int] = field(default_factory=dict)
    # Hidden in-worker queueing (accepted, not yet closed by the worker).
    inflight: int = 0
    inflight_max: int = 0
    busy_accepts: int = 0
    closed: int = 0
    life_sum_ns: int = 0
    life_max_ns: int = 0


@dataclass(slots=True)
class _Worker:
    pid: int
    ppid: int | None
    cmdline: str
    role: str
    create_time: float | None
    discovered: bool  # ever part of a discovered topology
    alive: bool
    exited_ns: int | None = None  # monotonic ns when it was first seen gone (eviction order)
    raw: _Raw = field(default_factory=_Raw)
    base: _Raw = field(default_factory=_Raw)  # counts of an earlier process that had this pid
    prev_accepts: int = 0  # own accepts at the previous update (rate deltas)
    first_own_ns: int | None = None  # when base is non-zero: first update that showed own accepts
    blocked_samples: int = 0  # samples that caught it blocked in its handler holding connections
    blocked_max: int = 0  # most connections it held at such a sample (daemon/blocked.py)
    ident: dict[str, Any] = field(default_factory=dict)  # nspid / container (daemon/procident.py)

    @property
    def accepts(self) -> int:
        return max(0, self.raw.accepts - self.base.accepts)

    def wait_hist(self) -> dict[int, int]:
        if not self.base.hist:
            return {k: v for k, v in self.raw.hist.items() if v > 0}
        out = {k: v - self.base.hist.get(k, 0) for k, v in self.raw.hist.items()}
        return {k: v for k, v in out.items() if v > 0}


def _same_process(a: float | None, b: float | None) -> bool:
    # psutil derives create_time from boot time + start ticks: stable for one process, and two
    # processes sharing a pid are at least a clock tick (10 ms) apart.
    return a is None or b is None or abs(a - b) < 0.005


def _round(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


class Aggregator:
    """Feed update() periodically; read document() from any thread."""

    def __init__(
        self,
        topology: Topology,
        probe: str,
        probe_detail: str,
        kernel: str,
        wall_clock: Callable[[], int] = time.time_ns,
        mono_clock: Callable[[], int] = time.monotonic_ns,
        *,
        process_lookup: Callable[[int], ProcessInfo | None] = discovery.lookup_process,
        max_exited: int = 4096,
        history_points: int = 300,
        max_events: int = 1000,
        max_transitions: int = 16384,
        exited_retention_s: float | None = None,
    ) -> None:
        self.probe = probe
        self.probe_detail = probe_detail
        # The syscall-exit backstop next to fexit/kretprobe (daemon/backstop.py), once attached.
        self.backstop: dict[str, Any] | None = None
        # Failed --export writes so far (daemon/exportsink.py): {count, last_error, last_at}, or None.
        self.export_errors: dict[str, Any] | None = None
        self.kernel = kernel
        self.clock = ClockMap(wall_clock, mono_clock)
        self._lookup = process_lookup
        self._max_exited = max_exited
        # serve: an exited worker's record is folded away this long after it was seen gone
        self._retention_ns = None if exited_retention_s is None else int(exited_retention_s * _NS)
        self._max_transitions = max_transitions
        self._lock = threading.RLock()
        # The document changes only with update(): the terminal, the export, every dashboard push and
        # every /api/snapshot poll share one build per update. Treat it as read-only.
        self._generation = 0
        self._cached: tuple[int, Document] | None = None

        self._topology = topology
        self._workers: dict[int, _Worker] = {}
        # pid -> raw counts at eviction, so the kernel's still-present counter is not re-adopted
        self._evicted: dict[int, _Raw] = {}
        self._evicted_accepts = 0
        self._evicted_workers = 0
        # Queue waits of evicted workers, kept so that totals over all workers never go down (a
        # Prometheus histogram is a counter): bucket -> count, and the exact count and sum.
        self._evicted_wait: tuple[dict[int, int], list[int]] = ({}, [0, 0])
        self._listeners = ListenerTable(history_points)
        self._transitions: dict[tuple[int, int, int], int] = {}
        self._diag: dict[DiagCounter, int] = {}
        self._last_ns: int | None = None  # taken_ns of the latest snapshot
        self._ended_ns: int | None = None
        self._rates = RateTracker(self.clock.start_mono, self.clock.rel_s)
        # dicts (add_event) or raw ring records (add_event_block), newest last
        self._events: deque[dict[str, Any] | bytes] = deque(maxlen=max_events)
        self._roles: dict[int, str] = {}
        self._alive_now: set[int] | None = None
        self._shares = ShareTracker(self.clock.start_mono, topology.processes)
        self._masters = Masters()
        self._apply_topology(topology, self.clock.start_mono)
        self._listeners.apply_topology(topology, self.clock.start_mono)
        self._masters.update(topology, self._workers_roles(), None, iso_utc(self.clock.start_wall))

    # -- inputs ----------------------------------------------------------------------------------
    def set_probe(self, probe: str, detail: str) -> None:
        """The hook actually attached (known only after the attach, which follows the clock's start)."""
        with self._lock:
            self.probe, self.probe_detail = probe, detail
            self._generation += 1

    def add_event(self, ev: AcceptEvent) -> None:
        d = event_to_dict(ev, self.clock)
        with self._lock:
            self._events.append(d)

    def add_event_block(self, block: bytes, ports: frozenset[int] | None = None) -> None:
        """Records drained from the ring buffer: only the newest are kept (as raw bytes), and
        decoded when someone asks for them; at full rate most are never looked at."""
        newest = newest_events(block, self._events.maxlen or 0, ports)
        with self._lock:
            self._events.extend(newest)

    def recent_events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last `limit` per-connection events, oldest first."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._lock:
            if limit == 0:
                return []
            recent = list(self._events)[-limit:]
        return [event_to_dict(decode_event(e), self.clock) if isinstance(e, bytes) else e for e in recent]

    def note_blocked(self, holding: Mapping[int, int]) -> None:
        """pid -> connections held by a worker seen blocked in its handler (daemon/blocked.py)."""
        with self._lock:
            for pid, n in holding.items():
                w = self._workers.get(pid)
                if w is not None:
                    w.blocked_samples += 1
                    w.blocked_max = max(w.blocked_max, n)
                    self._generation += 1

    def update(self, snapshot: KernelSnapshot, topology: Topology, depths: Mapping[int, int],
               roles: Mapping[int, str] | None = None, alive: Set[int] | None = None) -> None:
        """roles: pid -> role from evidence (daemon/roles.py; default: discovery's structural roles);
        alive: the pids alive right now (default: the topology's processes)."""
        with self._lock:
            now = snapshot.taken_ns
            if self._last_ns is not None and now < self._last_ns:
                raise ValueError(f"snapshot at {now} ns is older than the previous one ({self._last_ns} ns)")
            self._topology = topology
            self._roles = dict(roles) if roles is not None else {}
            self._alive_now = set(alive) if alive is not None else None
            self._apply_topology(topology, now)
            self._apply_counters(snapshot, now)
            self._apply_shares(snapshot, topology, now)
            self._masters.update(topology, self._workers_roles(), self._alive_now, self.clock.iso(now))
            self._listeners.apply_topology(topology, now)
            self._listeners.apply_counters(snapshot, depths, now, self.clock.rel_s)
            self._transitions = dict(snapshot.transitions)
            self._diag = dict(snapshot.diag)
            self._last_ns = now
            self._evict()
            self._generation += 1

    # -- document --------------------------------------------------------------------------------
    def model(self, ended: bool = False) -> Document:
        """The typed document (analysis still empty: the run loop calls daemon/analysis.py on it)."""
        with self._lock:
            cached, generation = self._cached, self._generation
            if cached is not None and cached[0] == generation and not ended:
                return cached[1]
            if ended and self._ended_ns is None:
                self._ended_ns = self.clock.mono_clock()
                self._rates.close_last(self._last_ns)
            doc = Document.of_json_dict(self._build())
            self._cached = (generation, doc)
        return doc

    def document(self, ended: bool = False) -> dict[str, Any]:
        """The same as a JSON dict (Document.to_dict()), for readers of plain dicts."""
        return self.model(ended).to_dict()

    # -- internals -------------------------------------------------------------------------------
    def _new_worker(self, info: ProcessInfo | None, pid: int, discovered: bool, base: _Raw | None) -> _Worker:
        w = _Worker(
            pid=pid,
            ppid=info.ppid if info else None,
            cmdline=info.cmdline if info else "?",
            role=self._role(pid, info),
            create_time=info.create_time if info else None,
            discovered=discovered,
            alive=info is not None,
            # Read once per process: a process keeps its pid namespace, and moving a worker between
            # containers' cgroups is not something servers do.
            ident=procident.identity(pid) if info is not None else {},
        )
        if base is not None:
            w.base = base
            w.raw = _Raw(base.accepts, base.wait_count, base.wait_sum_ns, 0, 0, 0, dict(base.hist))
        return w

    def _retire(self, w: _Worker) -> None:
        """Drop a record from the document; its accepts stay in total_accepts (and, folded into one
        'exited workers' entry, in the fair-share figures)."""
        self._shares.fold(w.pid)
        self._evicted[w.pid] = w.raw
        self._evicted_accepts += w.accepts
        hist, sums = self._evicted_wait
        for k, v in w.wait_hist().items():
            hist[k] = hist.get(k, 0) + v
        sums[0] += max(0, w.raw.wait_count - w.base.wait_count)
        sums[1] += max(0, w.raw.wait_sum_ns - w.base.wait_sum_ns)
        self._evicted_workers += 1
        del self._workers[w.pid]

    def _role(self, pid: int, info: ProcessInfo | None) -> str:
        if pid in self._roles:
            return self._roles[pid]
        return info.role if info else "worker"

    def _workers_roles(self) -> dict[int, str]:
        return {pid: w.role for pid, w in self._workers.items()}

    def _apply_shares(self, snapshot: KernelSnapshot, topology: Topology, now: int) -> None:
        accepts: dict[tuple[int, int], int] = {}
        spans: dict[tuple[int, int], tuple[int, int]] = {}
        seqs: dict[tuple[int, int], tuple[int, int]] = {}
        for wc in snapshot.workers:
            key = (wc.pid, wc.port)
            accepts[key] = accepts.get(key, 0) + wc.accepts
            if wc.accepts:
                first, last = spans.get(key, (wc.first_ns, wc.last_ns))
                spans[key] = (min(first, wc.first_ns), max(last, wc.last_ns))
                if wc.first_seq and wc.last_seq:
                    first, last = seqs.get(key, (wc.first_seq, wc.last_seq))
                    seqs[key] = (min(first, wc.first_seq), max(last, wc.last_seq))
        by_port: dict[int, set[int]] = {}
        for lst in topology.listeners:
            by_port.setdefault(lst.port, set()).update(lst.pids)
        # A worker forked since the last scan of the tree is not in it yet; having accepted on a port,
        # it holds that port's listener.
        for (pid, port), c in accepts.items():
            if c > 0:
                by_port.setdefault(port, set()).add(pid)
        for port, pids in by_port.items():
            by_port[port] = {p for p in pids if p in self._workers and self._workers[p].role == "worker"}
        alive = {pid for pid, w in self._workers.items() if w.alive}
        # psutil's create_time is boot time + the start ticks since boot; back to ticks (10 ms), then from
        # CLOCK_BOOTTIME to CLOCK_MONOTONIC (the probes' clock): the wall clock's whole-second boot time
        # would shift every start by up to a second.
        boot_s = psutil.boot_time()
        offset_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
        born = {pid: int((w.create_time - boot_s) * 1e9) - offset_ns for pid, w in self._workers.items()
                if w.create_time is not None}
        # Every source that knows the kernel's per-port accept sequence gives it for all its accepting
        # workers; a source that never does (synthetic, old tests) gets the time-spread clock.
        self._shares.update(accepts, by_port, alive, now, spans, born, seqs if seqs else None)

    def _apply_topology(self, topology: Topology, now: int) -> None:
        for pid, info in topology.processes.items():
            w = self._workers.get(pid)
            if w is not None and not _same_process(w.create_time, info.create_time):
                base = w.raw
                self._retire(w)  # the pid was reused: the old process is gone
                self._evicted.pop(pid, None)
                self._workers[pid] = self._new_worker(info, pid, True, base)
                continue
            if w is None:
                self._workers[pid] = self._new_worker(info, pid, True, self._evicted.pop(pid, None))
                continue
            # cmdline changes after fork (gunicorn and nginx set their process titles)
            w.cmdline, w.ppid, w.create_time = info.cmdline, info.ppid, info.create_time
            w.role = self._role(pid, info)
            w.discovered = True
            if self._alive_now is None or pid in self._alive_now:
                w.alive = True
                w.exited_ns = None
        for pid, w in self._workers.items():
            if pid in self._roles:
                w.role = self._roles[pid]
            if not w.alive:
                continue
            if pid in topology.processes or self._alive_now is not None:
                # alive_now covers the tree and every process the kernel saw accept: it is checked
                # at every update, the tree only at scans.
                if self._alive_now is not None and pid not in self._alive_now:
                    w.alive = False
                    w.exited_ns = now
                continue
            if not w.discovered:
                # Seen only through the kernel (forked between refreshes): ask the system directly.
                info = self._lookup(pid)
                if info is not None and _same_process(w.create_time, info.create_time):
                    continue
            w.alive = False
            w.exited_ns = now

    def _apply_counters(self, snapshot: KernelSnapshot, now: int) -> None:
        raws: dict[int, _Raw] = {}
        for wc in snapshot.workers:
            r = raws.setdefault(wc.pid, _Raw())
            r.accepts += wc.accepts
            r.wait_count += wc.wait_count
            r.wait_sum_ns += wc.wait_sum_ns
            r.wait_max_ns = max(r.wait_max_ns, wc.wait_max_ns)
            r.inflight += wc.inflight
            r.inflight_max = max(r.inflight_max, wc.inflight_max)
            r.busy_accepts += wc.busy_accepts
            r.closed += wc.closed
            r.life_sum_ns += wc.life_sum_ns
            r.life_max_ns = max(r.life_max_ns, wc.life_max_ns)
            if wc.accepts:
                r.first_ns = wc.first_ns if not r.first_ns else min(r.first_ns, wc.first_ns)
                r.last_ns = max(r.last_ns, wc.last_ns)
        for (pid, _port), buckets in snapshot.wait_hist.items():
            r = raws.setdefault(pid, _Raw())
            for idx, c in buckets.items():
                r.hist[idx] = r.hist.get(idx, 0) + c

        deltas: dict[int, int] = {}
        for pid, raw in raws.items():
            w = self._workers.get(pid)
            if w is None:
                evicted = self._evicted.get(pid)
                if evicted is not None and raw.accepts <= evicted.accepts:
                    continue  # an evicted worker's counter, unchanged: already in the totals
                info = self._lookup(pid)
                w = self._new_worker(info, pid, False, self._evicted.pop(pid, None))
                if info is None:
                    w.exited_ns = now
                self._workers[pid] = w
            w.raw = raw
            own = w.accepts
            if own > 0 and w.base.accepts and w.first_own_ns is None:
                w.first_own_ns = now
            # Kernel counters never decrease (the map is not pruned), so only increases are deltas.
            if own > w.prev_accepts:
                deltas[pid] = own - w.prev_accepts
            w.prev_accepts = own

        self._rates.add(now, deltas)

    def evicted_pids(self) -> set[int]:
        """Folded-away pids whose kernel counters are still remembered (to tell them from new ones)."""
        with self._lock:
            return set(self._evicted)

    def forget_evicted(self, pids: Set[int]) -> None:
        """The kernel entries of these folded-away pids were deleted: a new process with one of these
        pids starts from zero (no baseline to subtract)."""
        with self._lock:
            for pid in pids:
                self._evicted.pop(pid, None)

    def _evict(self) -> None:
        if self._retention_ns is not None and self._last_ns is not None:
            horizon = self._last_ns - self._retention_ns
            for w in [w for w in self._workers.values()
                      if not w.alive and w.exited_ns is not None and w.exited_ns <= horizon]:
                self._retire(w)
        exited = [w for w in self._workers.values() if not w.alive]
        if len(exited) > self._max_exited:
            exited.sort(key=lambda w: (w.exited_ns or 0, w.pid))
            for w in exited[: len(exited) - self._max_exited]:
                self._retire(w)
        self._listeners.evict()

    @staticmethod
    def _inflight_doc(w: _Worker) -> dict[str, Any]:
        """Connections the worker accepted and has not closed yet: a worker that keeps accepting
        while it holds many (asyncio servers) queues requests inside itself, out of the kernel's
        sight. Per-port maxima are summed conservatively as the largest single-port maximum."""
        closed = max(0, w.raw.closed - w.base.closed)
        life_sum = max(0, w.raw.life_sum_ns - w.base.life_sum_ns)
        return {
            "now": w.raw.inflight if w.alive else 0,
            "max": w.raw.inflight_max,
            "busy_accepts": max(0, w.raw.busy_accepts - w.base.busy_accepts),
            "closed": closed,
            "blocked_samples": w.blocked_samples,
            "blocked_max": w.blocked_max,
            "life_ms": {
                "mean": _round(life_sum / closed / 1e6) if closed else None,
                "max": _round(w.raw.life_max_ns / 1e6) if closed else None,
            },
        }

    def _worker_doc(self, w: _Worker, total: int, rates: dict[str, float]) -> dict[str, Any]:
        own = w.accepts
        hist = w.wait_hist()
        count = max(0, w.raw.wait_count - w.base.wait_count)
        wait_sum = max(0, w.raw.wait_sum_ns - w.base.wait_sum_ns)
        if count > 0:
            p50, p99 = percentile(hist, 50), percentile(hist, 99)
            wait = {
                "p50": _round(p50 / 1000 if p50 is not None else None),
                "p99": _round(p99 / 1000 if p99 is not None else None),
                "max": _round(w.raw.wait_max_ns / 1000),
                "mean": _round(wait_sum / count / 1000),
                "count": count,
            }
        else:
            wait = {"p50": None, "p99": None, "max": None, "mean": None, "count": 0}
        first: str | None = None
        last: str | None = None
        if own > 0:
            first_ns = w.first_own_ns if w.base.accepts else w.raw.first_ns
            first = self.clock.iso(first_ns) if first_ns else None
            last = self.clock.iso(w.raw.last_ns) if w.raw.last_ns else None
        return {
            "pid": w.pid,
            "ppid": w.ppid,
            "cmdline": w.cmdline,
            "role": w.role,
            "accepts": own,
            "share": own / total if total else 0.0,
            "alive": w.alive,
            "first_seen": first,
            "last_seen": last,
            "rate": {f"{s}s": rates.get(f"{s}s", 0.0) for s in RATE_WINDOWS_S},
            "queue_wait_us": wait,
            "inflight": self._inflight_doc(w),
            "queue_wait_hist": [[*bucket_bounds(i), c] for i, c in sorted(hist.items())],
            **w.ident,
        }

    def _transitions_doc(self) -> tuple[list[dict[str, int]], int]:
        items = list(self._transitions.items())
        omitted = 0
        if len(items) > self._max_transitions:
            items.sort(key=lambda kv: -kv[1])
            omitted = len(items) - self._max_transitions
            items = items[: self._max_transitions]
        items.sort(key=lambda kv: kv[0])
        return [{"port": p, "from": a, "to": b, "count": c} for (p, a, b), c in items], omitted

    def _build(self) -> dict[str, Any]:
        total = sum(w.accepts for w in self._workers.values()) + self._evicted_accepts
        rates = self._rates.rates(self._last_ns)
        workers = [self._worker_doc(w, total, rates.get(pid, {})) for pid, w in sorted(self._workers.items())]
        listeners = self._listeners.to_doc()
        transitions, omitted = self._transitions_doc()
        diagnostics: dict[str, int] = {c.name.lower(): int(self._diag.get(c, 0)) for c in DiagCounter}
        diagnostics["evicted_workers"] = self._evicted_workers
        diagnostics["evicted_accepts"] = self._evicted_accepts
        diagnostics["transitions_omitted"] = omitted
        end = self._ended_ns if self._ended_ns is not None else self.clock.mono_clock()
        updated = self._last_ns if self._last_ns is not None else self.clock.start_mono
        return {
            "schema": SCHEMA_ID,
            "tool_version": __version__,
            "master_pid": self._topology.master_pid,
            "master_cmdline": self._topology.master_cmdline,
            "probe": self.probe,
            "probe_detail": self.probe_detail,
            "backstop": self.backstop,
            "export_errors": self.export_errors,
            "kernel": self.kernel,
            "started_at": iso_utc(self.clock.start_wall),
            "updated_at": self.clock.iso(updated),
            "ended_at": self.clock.iso(self._ended_ns) if self._ended_ns is not None else None,
            "duration_s": round(max(0, end - self.clock.start_mono) / _NS, 3),
            "total_accepts": total,
            "lost_events": int(self._diag.get(DiagCounter.EVENTS_LOST, 0)),
            "unattributed": int(sum(self._diag.get(c, 0) for c in LOSS_COUNTERS)),
            "diagnostics": diagnostics,
            "evicted_queue_wait": {
                "hist": [[*bucket_bounds(i), c] for i, c in sorted(self._evicted_wait[0].items())],
                "count": self._evicted_wait[1][0],
                "sum_us": round(self._evicted_wait[1][1] / 1000, 3),
            },
            "listeners": listeners,
            "workers": workers,
            "rate_history": self._rates.history(),
            "fair_share": self._shares.to_doc(self.clock.rel_s),
            "masters": self._masters.to_doc(),
            "analysis": {},
            "transitions": transitions,  # last, as in the model (the streamed document leaves it out)
        }
