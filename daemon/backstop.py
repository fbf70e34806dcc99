"""The syscall-exit backstop next to fexit/kretprobe, and when to retire it.

A freshly attached fexit or kretprobe on inet_csk_accept never sees an accept() call that was
already inside the kernel at that moment: the call returns the old way. The accept syscall-exit
tracepoints catch those (counted as backstop accepts). Once every thread that was inside accept()
at attach time has come out of it, nothing is left for them to catch, while they cost every accept
the fd-table walk: they are switched off (the kernel side removes each thread from `backstop_pending`
at its accept's exit). Switched off, not detached: see AcceptProbes.retire_backstop.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from accept_watch.probes.records import ProbeKind

from . import waitmode


def _accept_nrs(table: dict[int, str] | None) -> set[int]:
    table = table if table is not None else waitmode.syscall_table()
    return {nr for nr, name in table.items() if name in waitmode.ACCEPT_SYSCALL_NAMES}


def _might_be_in_accept(st: waitmode.SyscallState, accept_nrs: set[int]) -> bool:
    # A running thread may be inside accept() (/proc cannot tell): counted as if it were.
    return st.running or st.nr in accept_nrs


def threads_in_accept(
    pids: Iterable[int],
    read_states: Callable[[int], dict[int, waitmode.SyscallState]] = waitmode.read_task_states,
    table: dict[int, str] | None = None,
) -> set[int]:
    """Threads of `pids` inside accept()/accept4() now, or running."""
    accept_nrs = _accept_nrs(table)
    found: set[int] = set()
    for pid in pids:
        try:
            states = read_states(pid)
        except ProcessLookupError:
            continue
        found |= {tid for tid, st in states.items() if _might_be_in_accept(st, accept_nrs)}
    return found


def read_thread_state(tid: int) -> waitmode.SyscallState | None:
    """One thread's /proc syscall state; None when the thread is gone."""
    try:
        with open(f"/proc/{tid}/syscall") as f:
            return waitmode.parse_syscall(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


def left_accept(
    tids: Iterable[int],
    read_state: Callable[[int], waitmode.SyscallState | None] = read_thread_state,
    table: dict[int, str] | None = None,
) -> set[int]:
    """Of `tids`, those certainly out of any accept() begun earlier: gone, or seen blocked elsewhere.
    (A thread seen in accept() again may be in a new call: the kernel ticks it off at the exit.)"""
    accept_nrs = _accept_nrs(table)
    out = set()
    for tid in tids:
        st = read_state(tid)
        if st is None or not _might_be_in_accept(st, accept_nrs):
            out.add(tid)
    return out


class Backstop:
    """State of the backstop for the document: not used (tracepoint is the primary hook), attached
    (waiting for `pending` threads), retired (switched off), or kept (cannot tell when to retire it)."""

    def __init__(self, probes: Any, kind: ProbeKind, pids: Iterable[int], started: float) -> None:
        self.probes = probes
        self.started = started
        self.pending_at_attach = 0
        self.retired_after_s: float | None = None
        self.reason = ""
        if kind is ProbeKind.TRACEPOINT:
            self.state = "not used"
            return
        try:
            pending = threads_in_accept(pids)
        except (NotImplementedError, PermissionError) as exc:
            self.state, self.reason = "kept", str(exc)
            return
        probes.seed_backstop(pending)
        self.pending_at_attach = len(pending)
        self.state = "attached"

    def check(self, now: float) -> None:
        """Retire the backstop once no thread is left in an accept() begun before attach. A thread
        that was running at attach (perhaps in accept(), perhaps not: a busy request thread that
        never accepts) is ticked off here once /proc shows it anywhere but in accept()."""
        if self.state != "attached":
            return
        pending = self.probes.backstop_pending()
        if pending:
            self.probes.clear_backstop(left_accept(pending))
            pending = self.probes.backstop_pending()
        if pending:
            return
        self.probes.retire_backstop()
        self.state = "retired"
        self.retired_after_s = round(now - self.started, 3)
        print(
            f"accept-watch: syscall-exit backstop switched off after {self.retired_after_s:.1f} s "
            f"({self.pending_at_attach} accept() calls in progress at attach had returned)",
            file=sys.stderr,
        )

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"state": self.state, "pending_at_attach": self.pending_at_attach,
                               "retired_after_s": self.retired_after_s}
        if self.reason:
            doc["reason"] = self.reason
        return doc
