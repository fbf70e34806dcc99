"""Requests waiting inside a worker: connections accepted while the worker's handler is blocked.

Many connections in flight is normal for a worker that serves them in parallel: threads (one of
them waits in accept/poll for the next connection), a child process per connection (the parent
waits in poll), an event loop (it sits in epoll_wait between callbacks). Requests *wait inside* a
worker when it holds accepted connections while none of its threads can serve them: every thread is
blocked in something other than waiting for connections or I/O readiness (a handler sleeping, or
waiting on a database, inside an event loop: the classic blocking call in an async handler).

Evidence, per worker holding two or more connections: two looks at /proc/PID/task/*/syscall
LOOK_GAP_S apart, both with no thread waiting (epoll/poll/select/accept/io_uring) and none running
(a CPU-bound loop is not evidence either way). One such sample can be chance; the analysis asks for
several (daemon/analysis.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from .procwait import WAITING_SYSCALL_NAMES, SyscallState, read_task_states, syscall_table

LOOK_GAP_S = 0.05


def _blocked_elsewhere(states: dict[int, SyscallState], table: dict[int, str]) -> bool:
    """No thread waits for connections or readiness, none runs, at least one is blocked."""
    if not states:
        return False
    for st in states.values():
        if st.running:
            return False
        if st.nr is not None and st.nr >= 0 and table.get(st.nr) in WAITING_SYSCALL_NAMES:
            return False
    return True


def blocked_workers(pids: Iterable[int]) -> set[int]:
    """The workers (among pids) blocked in their handler at two looks LOOK_GAP_S apart."""
    table = syscall_table()

    def look(candidates: Iterable[int]) -> set[int]:
        out = set()
        for pid in candidates:
            try:
                if _blocked_elsewhere(read_task_states(pid), table):
                    out.add(pid)
            except (ProcessLookupError, PermissionError):
                continue
        return out

    first = look(pids)
    if not first:
        return set()
    time.sleep(LOOK_GAP_S)
    return look(first)
