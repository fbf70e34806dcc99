"""The server's listening sockets over a run: what discovery saw, what the kernel counted, the
accept-queue depth sampled each update, listen drops. Bounded: at most MAX_LISTENERS are kept, closed
ones evicted oldest first."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from accept_watch.probes.records import KernelSnapshot, ListenerCounters

from .discovery import ListenDepths, Topology

MAX_LISTENERS = 1024


@dataclass(slots=True)
class _ListenerState:
    inode: int
    family: str | None  # None: seen only by the kernel (opened and closed between two scans)
    address: str | None
    port: int
    pids: list[int]
    mode: str
    open: bool
    closed_ns: int | None = None
    depth_current: int | None = None
    depth_sampled_max: int | None = None
    drops: int | None = None  # sk_drops: SYNs/handshakes dropped on a full queue (None: not shown)
    history: deque[list[float]] = field(default_factory=deque)


class ListenerTable:
    def __init__(self, history_points: int) -> None:
        self._history_points = history_points
        self._listeners: dict[int, _ListenerState] = {}
        self._kernel: dict[int, ListenerCounters] = {}

    def apply_topology(self, topology: Topology, now: int) -> None:
        current = {lst.inode: lst for lst in topology.listeners}
        for inode, lst in current.items():
            st = self._listeners.get(inode)
            if st is None:
                st = _ListenerState(
                    inode, lst.family, lst.address, lst.port, list(lst.pids), lst.mode, True,
                    history=deque(maxlen=self._history_points),
                )
                self._listeners[inode] = st
            st.family, st.address, st.port = lst.family, lst.address, lst.port
            st.pids, st.mode, st.open, st.closed_ns = list(lst.pids), lst.mode, True, None
        for inode, st in self._listeners.items():
            if inode not in current and st.open and st.mode != "unknown":
                st.open = False
                st.closed_ns = now
                st.depth_current = None

    def apply_counters(self, snapshot: KernelSnapshot, depths: Mapping[int, int], now: int,
                       rel_s: Callable[[int], float]) -> None:
        fresh = {lc.inode: lc for lc in snapshot.listeners}
        # A closed listener's kernel entry may be deleted (serve prunes them after the retention time):
        # its last counters stay while the listener is listed.
        kept = {i: lc for i, lc in self._kernel.items() if i in self._listeners and i not in fresh}
        self._kernel = {**kept, **fresh}
        for lc in snapshot.listeners:
            if lc.inode not in self._listeners:
                # Counted by the kernel but never seen by discovery (opened and closed between two
                # refreshes): still listed, so per-listener accepts add up.
                self._listeners[lc.inode] = _ListenerState(
                    lc.inode, None, None, lc.port, [], "unknown", False, closed_ns=now,
                    history=deque(maxlen=self._history_points),
                )
        t = round(rel_s(now), 3)
        drops = depths.drops if isinstance(depths, ListenDepths) else {}
        for inode, st in self._listeners.items():
            d = depths.get(inode)
            if not st.open:
                continue
            st.drops = drops.get(inode, st.drops)
            st.depth_current = d
            if d is None:
                continue
            st.history.append([t, d])
            st.depth_sampled_max = d if st.depth_sampled_max is None else max(st.depth_sampled_max, d)

    def evict(self) -> None:
        closed = [st for st in self._listeners.values() if not st.open]
        extra = len(self._listeners) - MAX_LISTENERS
        if extra > 0:
            closed.sort(key=lambda st: (st.closed_ns or 0, st.inode))
            for st in closed[:extra]:
                del self._listeners[st.inode]

    def to_doc(self) -> list[dict[str, Any]]:
        order = sorted(self._listeners.values(),
                       key=lambda s: (s.port, s.family or "", s.address or "", s.inode))
        return [self._doc(st) for st in order]

    def _doc(self, st: _ListenerState) -> dict[str, Any]:
        lc = self._kernel.get(st.inode)
        limit: int | None = lc.backlog_limit if lc is not None else None
        if limit is None:  # no accept seen on this inode yet: same port, same listen() backlog
            same_port = (k.backlog_limit for k in self._kernel.values() if k.port == st.port)
            limit = next(same_port, None)
        maxes = [m for m in (lc.depth_max if lc is not None else None, st.depth_sampled_max) if m is not None]
        depth = {"current": st.depth_current, "max": max(maxes) if maxes else None, "limit": limit}
        return {
            "address": st.address,
            "port": st.port,
            "family": st.family,
            "inode": st.inode,
            "mode": st.mode,
            "pids": list(st.pids),
            "open": st.open,
            "accepts": lc.accepts if lc is not None else 0,
            "queue_depth": depth,
            "drops": st.drops,
            "depth_history": [list(p) for p in st.history],
        }
