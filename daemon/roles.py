"""Who is a worker: roles from evidence, not from the process tree.

A server is its listening sockets. A process of the server's tree is a *worker* only when it was seen
taking connections from them: it accepted one (the kernel counted it), or a /proc sample caught it
waiting on a listener (blocked in accept(), or in poll/select/epoll with a listener in its set, or
serialised by the server's accept mutex). The rest are listed apart and never enter fairness:
  master  the process being watched (or its successor), and any other holder of a listener that
          waits on nothing of it but has workers as children (a gunicorn USR2 master starting its own
          generation);
  helper  everything else: processes that hold no listener (multiprocessing's resource_tracker), or
          hold it without ever waiting on it (ForkingTCPServer's per-connection children).
Evidence only accumulates: a worker seen waiting once stays a worker while it lives.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from .waitmode import WaitMode

ROLES = ("master", "worker", "helper")


def assign_roles(
    ppids: Mapping[int, int],
    holders: Set[int],
    master_pid: int,
    accepted: Set[int],
    wait_modes: Mapping[int, WaitMode],
) -> dict[int, str]:
    """pid -> role for every pid of `ppids` (the server's processes, pid -> parent pid).

    holders: pids that hold one of the server's listening sockets; accepted: pids the kernel saw
    accept; wait_modes: the latest evidence per pid (waitmode.WaitMode.evidence == "listener" is a
    proven wait on a listener).
    """
    workers = {
        pid for pid in ppids
        if pid in accepted or (pid in wait_modes and wait_modes[pid].evidence == "listener")
    }
    parents_of_workers = {ppids[w] for w in workers}
    roles: dict[int, str] = {}
    for pid in ppids:
        if pid in workers:
            roles[pid] = "worker"
        elif pid == master_pid or (pid in holders and pid in parents_of_workers):
            roles[pid] = "master"
        else:
            roles[pid] = "helper"
    return roles
