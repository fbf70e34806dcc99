"""The server's masters over time: the one watched first, its successors (a gunicorn USR2 master
that carries on after the old one exits, a new master after a full restart found through --pidfile)
and any master seen starting its own generation of workers."""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

from .discovery import Topology

MAX_MASTERS = 256


@dataclass(slots=True)
class _Master:
    pid: int
    cmdline: str
    first_seen: str
    exited_at: str | None = None
    watched: bool = False  # the process accept-watch followed as the server's master


class Masters:
    def __init__(self) -> None:
        self._masters: dict[int, _Master] = {}

    def update(self, topology: Topology, roles: Mapping[int, str], alive: Set[int] | None,
               now_iso: str) -> None:
        for pid, info in topology.processes.items():
            if roles.get(pid) == "master" or pid == topology.master_pid:
                m = self._masters.get(pid)
                if m is None:
                    if len(self._masters) >= MAX_MASTERS:
                        continue
                    m = self._masters[pid] = _Master(pid, info.cmdline, now_iso)
                m.cmdline = info.cmdline
        if topology.master_pid in self._masters:
            self._masters[topology.master_pid].watched = True
        for pid, m in self._masters.items():
            gone = pid not in topology.processes or (alive is not None and pid not in alive)
            if gone and m.exited_at is None:
                m.exited_at = now_iso

    def to_doc(self) -> list[dict[str, Any]]:
        return [{"pid": m.pid, "cmdline": m.cmdline, "first_seen": m.first_seen, "exited_at": m.exited_at,
                 "alive": m.exited_at is None, "watched": m.watched}
                for m in sorted(self._masters.values(), key=lambda m: (m.first_seen, m.pid))]
