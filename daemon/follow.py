"""Follow a server through deploys: the watched master may exit while its server carries on.

A server is its listening sockets. When the master goes away:
  * another process may still hold those sockets - a gunicorn USR2 master (a child of the old one,
    re-parented to init when the old one is TERMed) and its workers: it becomes the watched master,
    nothing is re-attached (the kernel already follows their forks);
  * nothing holds them any more, but --pidfile names a new live master (a full restart, new
    sockets): its tree is tracked and its ports watched;
  * neither, for `grace_s` seconds: the server is gone and the run ends (said in one line).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from . import discovery
from .discovery import DiscoveryError, Topology
from .sanitize import clean


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def only_ports(topology: Topology, ports: set[int] | None) -> Topology:
    """The topology restricted to the listening ports asked for (--port)."""
    if not ports:
        return topology
    return dataclasses.replace(topology, listeners=[lst for lst in topology.listeners if lst.port in ports])


class Follower:
    def __init__(self, topology: Topology, *, pidfile: str | None, grace_s: float, ports: set[int] | None,
                 on_new_processes: Callable[[Iterable[int]], None],
                 on_new_ports: Callable[[Iterable[int]], None],
                 say: Callable[[str], None]) -> None:
        self.topology = topology
        self._pidfile = pidfile
        self._grace_s = grace_s
        self._ports = ports
        self._track = on_new_processes
        self._watch_ports = on_new_ports
        self._say = say
        self._gone_since: float | None = None

    def master_gone(self, now: float) -> bool:
        """The watched master has exited: find who carries on. False once the grace period ran out
        with nobody to follow (the run should end)."""
        old = self.topology
        successor = discovery.find_successor(old)
        if successor is not None and self._adopt(successor, same_sockets=True):
            return True
        if self._pidfile:
            pid = discovery.read_pidfile(self._pidfile)
            if pid is not None and pid != old.master_pid and self._adopt(pid, same_sockets=False):
                return True
        if self._gone_since is None:
            self._gone_since = now
            wait = f"; waiting up to {self._grace_s:g} s for a successor"
            src = f" or a new pid in {clean(self._pidfile[:200])}" if self._pidfile else ""
            self._say(f"master {old.master_pid} exited and no process holds its listening sockets{src}{wait}")
        if now - self._gone_since >= self._grace_s:
            self._say(f"master {old.master_pid} exited and nothing took over its listening sockets within "
                      f"{self._grace_s:g} s; stopping")
            return False
        return True

    def _adopt(self, pid: int, same_sockets: bool) -> bool:
        old = self.topology
        try:
            fresh = discovery.discover(pid)
        except DiscoveryError:
            return False
        if self._ports:
            if not {lst.port for lst in fresh.listeners} & self._ports:
                return False
            fresh = only_ports(fresh, self._ports)
        new_pids = set(fresh.processes) - set(old.processes)
        if new_pids:
            self._track(new_pids)
        new_ports = {lst.port for lst in fresh.listeners} - {lst.port for lst in old.listeners}
        if new_ports:
            self._watch_ports(new_ports)
        how = ("which holds the same listening sockets" if same_sockets
               else f"named by {clean((self._pidfile or '')[:200])} (a restart with new sockets)")
        name = _short(clean(fresh.master_cmdline), 60)
        self._say(f"master {old.master_pid} exited; following pid {pid} ({name}), {how}")
        self.topology = fresh
        self._gone_since = None
        return True

    def waiting(self) -> bool:
        return self._gone_since is not None
