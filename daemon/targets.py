"""One watched server of `accept-watch serve`: its current topology, its aggregator, its life.

A target is up (a master and its tree are known) or down (nothing runs for it now: not an error; it
is looked for again every resolve period). Its aggregator lives as long as the daemon: a restart (a
new master, found through the same sockets, the pid file, the unit, the port or the match) is a new
generation of the same target, and counts carry on. The per-target pieces of session mode are
reused as they are (daemon/watch.py: TreeCheck, WaitModes, BlockedSampler, the evidence rule).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from accept_watch.probes.records import KernelSnapshot

from . import analysis, discovery, resolve, watch
from .discovery import Topology
from .sanitize import clean
from .stats import Aggregator
from .targetspec import TargetSpec, derived_name

SUCCESSOR_WINDOW_S = 30.0  # after the master exits, look for a process holding its sockets this long
MAX_INODES = 1024  # listening sockets remembered per target (older ones are dropped first)


@dataclasses.dataclass(slots=True)
class Kernel:
    """What every target shares: the probes' tracked set and watched ports, the pid ownership map."""

    track: Callable[[Iterable[int]], None]
    watch_ports: Callable[[Iterable[int]], None]
    owners: dict[int, Target]
    say: Callable[[str], None]
    probe: str = "pending"
    probe_detail: str = ""
    retention_s: float = 300.0


def _empty(last: Topology) -> Topology:
    """The topology of a target that is down: nothing alive, no listener open."""
    return Topology(last.master_pid, last.master_cmdline, {}, [])


class Target:
    def __init__(self, spec: TargetSpec | None, name: str | None, kernel: Kernel,
                 dynamic: bool = False) -> None:
        self.spec = spec
        self.name = name if name is not None else (derived_name(spec) if spec else None)
        self.dynamic = dynamic  # found by --all: dropped after being down for the retention time
        self.k = kernel
        self.topology: Topology | None = None
        self.last: Topology | None = None  # the latest topology, kept while down
        self.aggregator: Aggregator | None = None
        self.generation = 0  # masters followed so far (1 = the first; each restart adds one)
        self.down_since: float | None = time.monotonic()
        self.pids: set[int] = set()  # every pid this target owns (kernel entries not yet pruned)
        self.inodes: dict[int, None] = {}  # listening sockets it has had, oldest first
        self.netns: int | None = None
        self._tree: watch.TreeCheck | None = None
        self._wait_modes: watch.WaitModes | None = None
        self._blocked = watch.BlockedSampler()
        self._notes: set[str] = set()
        self.latest: dict[str, Any] | None = None  # the last published document (publish())

    # -- state ------------------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return self.topology is not None

    def label(self) -> str:
        return self.name or (self.spec.describe() if self.spec else "?")

    def note_once(self, line: str) -> None:
        if line not in self._notes and len(self._notes) < 64:
            self._notes.add(line)
            self.k.say(line)

    def summary(self) -> dict[str, Any]:
        topo = self.topology or self.last
        doc = self.latest
        return {
            "server": self.name, "spec": None if self.spec is None else {"kind": self.spec.kind,
                                                                         "value": self.spec.value},
            "dynamic": self.dynamic, "up": self.up, "generation": self.generation,
            "master_pid": topo.master_pid if topo else None,
            "ports": topo.ports if self.up and topo else [],
            "down_for_s": None if self.down_since is None else round(time.monotonic() - self.down_since, 1),
            "total_accepts": doc["total_accepts"] if doc else 0,
            "live_workers": sum(1 for w in (doc or {}).get("workers", []) if w.get("alive")
                                and w.get("role") == "worker"),
        }

    # -- finding the server ---------------------------------------------------------------------
    def resolve(self, is_owned: Callable[[int], bool]) -> bool:
        """Look for the server now (it is down). True when found and adopted."""
        if self.spec is None:
            return self._successor()
        excluded = lambda pid: pid == os.getpid() or is_owned(pid)  # noqa: E731
        master = resolve.resolve(self.spec, excluded)
        if master is None:
            return self._successor()
        return self.adopt(master, "found")

    def _successor(self) -> bool:
        """A process still holding the last master's sockets (a USR2 upgrade): shortly after it exits."""
        if self.last is None or self.down_since is None or not self.last.listeners:
            return False
        if time.monotonic() - self.down_since > SUCCESSOR_WINDOW_S:
            return False
        pid = discovery.find_successor(self.last)
        return (pid is not None and self.k.owners.get(pid) in (None, self)  # a USR2 master is our child
                and self.adopt(pid, "holds the same sockets"))

    def adopt(self, master: int, how: str) -> bool:
        try:
            topology = discovery.discover(master)
        except discovery.DiscoveryError:
            return False
        taken = {p: t for p in topology.processes if (t := self.k.owners.get(p)) is not None and t is not self
                 and t.topology is not None and p in t.topology.processes}
        if master in taken:
            self.note_once(f"target {self.label()}: pid {master} is already watched as "
                           f"{taken[master].label()}")
            return False
        if self.name is None:  # a --pid target: named after what it is, as in session mode
            from accept_watch.dashboard.metrics import server_name

            self.name = server_name({"master_cmdline": topology.master_cmdline,
                                     "listeners": [{"port": p} for p in topology.ports]})
        first = self.aggregator is None
        self.generation += 1
        self._take(topology)
        # A worker forked between the scan and the kernel tracking its parent is followed by neither
        # (a server found while it starts: --all, a restart): a second scan, now that the tree is
        # tracked, finds it; later forks the kernel follows itself.
        with contextlib.suppress(discovery.DiscoveryError):
            again = discovery.refresh(topology)
            if set(again.processes) - set(topology.processes):
                topology = again
                self._take(topology)
        if first:
            self.aggregator = Aggregator(topology, probe=self.k.probe, probe_detail=self.k.probe_detail,
                                         kernel=os.uname().release, exited_retention_s=self.k.retention_s)
        self._wait_modes = watch.WaitModes(topology)
        self._tree = watch.TreeCheck(topology)
        self.down_since = None
        self.publish()  # readable as soon as it is up, not only after the next read
        cmd = clean(topology.master_cmdline)[:80]
        self.k.say(f"target {self.name}: up, generation {self.generation}, master {master} ({cmd}) {how}; "
                   f"ports {','.join(map(str, topology.ports))}, {len(topology.processes)} processes")
        return True

    def publish(self, ended: bool = False) -> dict[str, Any] | None:
        """The analyzed document (as in session mode: aggregator -> model -> analysis), kept as the one
        every view of this target reads until the next tick."""
        if self.aggregator is None:
            return None
        modes = self._wait_modes.current() if self._wait_modes is not None else {}
        doc = {**analysis.analyzed(self.aggregator.model(ended), modes).to_dict(), "server": self.name}
        self.latest = doc
        return doc

    def _take(self, topology: Topology) -> None:
        """Make `topology` current: its processes tracked by the kernel and owned, its ports watched."""
        new = set(topology.processes) - self.pids
        if new:
            self.k.track(new)
        for pid in topology.processes:
            self.claim(pid)
        old_ports = set(self.topology.ports) if self.topology else set()
        if set(topology.ports) - old_ports:
            self.k.watch_ports(set(topology.ports) - old_ports)
        for lst in topology.listeners:
            self.inodes.pop(lst.inode, None)
            self.inodes[lst.inode] = None
        while len(self.inodes) > MAX_INODES:
            del self.inodes[next(iter(self.inodes))]
        try:
            self.netns = os.stat(f"/proc/{topology.master_pid}/ns/net").st_ino
        except OSError:
            self.netns = None
        self.topology = self.last = topology

    def claim(self, pid: int) -> None:
        previous = self.k.owners.get(pid)
        if previous is not None and previous is not self:
            previous.pids.discard(pid)  # a reused pid: its old owner must not count the new process
        self.pids.add(pid)
        self.k.owners[pid] = self

    def release(self, pids: Iterable[int]) -> None:
        """Pids whose kernel entries were deleted: forgotten here too (ownership, sampled wait modes:
        session mode keeps up to 4096 exited ones, a daemon under churn should not)."""
        modes = self._wait_modes
        for pid in pids:
            self.pids.discard(pid)
            if self.k.owners.get(pid) is self:
                del self.k.owners[pid]
            if modes is not None:
                modes._raw.pop(pid, None)
                modes._ppid.pop(pid, None)

    # -- one read of the kernel counters ----------------------------------------------------------
    def tick(self, snapshot: KernelSnapshot, now: float, depths_here: Mapping[int, int] | None,
             own_netns: int | None) -> None:
        """Update from this target's share of a snapshot. depths_here: accept-queue lengths of every
        listener in accept-watch's own network namespace (one dump for all targets)."""
        if self.topology is not None:
            self._follow(snapshot, now)
        if self.aggregator is None:
            return
        topology = self.topology or _empty(self.last)  # type: ignore[arg-type]
        depths: Mapping[int, int] = {}
        if self.topology is not None:
            if self.netns is not None and self.netns == own_netns and depths_here is not None:
                depths = discovery.ListenDepths(
                    {i: d for i, d in depths_here.items() if i in self.topology.inodes},
                    {i: d for i, d in getattr(depths_here, "drops", {}).items() if i in self.topology.inodes})
            else:
                depths = watch._depths(self.topology) or {}
        modes = self._wait_modes or watch.WaitModes(topology)
        self.aggregator.update(snapshot, topology, depths, **watch._evidence(snapshot, topology, modes))
        if self.topology is not None and self._wait_modes is not None:
            self._wait_modes.maybe_sample(self.topology)
            self._blocked.maybe_sample(snapshot, self.aggregator)
        self.publish()

    def _follow(self, snapshot: KernelSnapshot, now: float) -> None:
        assert self.topology is not None and self._tree is not None
        if self._tree.due(now, snapshot):
            try:
                fresh = discovery.refresh(self.topology)
            except discovery.DiscoveryError:
                fresh = None
            if fresh is not None and discovery.pid_alive(fresh.master_pid):
                self._take(fresh)
                self._tree.scanned(now, fresh, snapshot)
                return
        if discovery.pid_alive(self.topology.master_pid):
            return
        # The master is gone: whoever carries on its sockets (USR2), else the spec again, else down.
        old = self.topology
        self.topology = None
        self.down_since = time.monotonic()
        self.k.say(f"target {self.name}: master {old.master_pid} exited")
        if self._successor() or (self.spec is not None and self.resolve(lambda p: p in self.k.owners
                                                                       and self.k.owners[p] is not self)):
            return
        self.k.say(f"target {self.name}: down (no process serves it now; looked for again periodically)")


def split(snapshot: KernelSnapshot, pids: set[int], inodes: Iterable[int]) -> KernelSnapshot:
    """The part of a snapshot that belongs to one target (its pids, its listening sockets). The
    in-kernel loss counters are shared by every target (one set of maps) and stay whole."""
    inode_set = set(inodes)
    return snapshot.restricted(lambda pid, _port: pid in pids, lambda lst: lst.inode in inode_set)
