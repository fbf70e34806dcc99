"""The syscall-exit backstop next to fexit/kretprobe, and when to retire it.

A freshly attached fexit or kretprobe on inet_csk_accept never sees an accept() call that was
already inside the kernel at that moment: the call returns the old way. The accept syscall-exit
tracepoints catch those (counted as backstop accepts). Once every thread that was inside accept()
at attach time has come out of it, nothing is left for them to catch, while keeping them costs every
accept a program run and puts every system call of the machine on the syscall-tracing path: they are
detached (the kernel side removes each thread from `backstop_pending` at its accept's exit).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from accept_watch.probes.records import ProbeKind

from . import waitmode

ACCEPT_SYSCALLS = frozenset({"accept", "accept4"})


def threads_in_accept(
    pids: Iterable[int],
    read_states: Callable[[int], dict[int, waitmode.SyscallState]] = waitmode.read_task_states,
    table: dict[int, str] | None = None,
) -> set[int]:
    """Threads of `pids` inside accept()/accept4() now, or running (they might be: counted as if)."""
    table = table if table is not None else waitmode.syscall_table()
    accept_nrs = {nr for nr, name in table.items() if name in ACCEPT_SYSCALLS}
    found: set[int] = set()
    for pid in pids:
        try:
            states = read_states(pid)
        except ProcessLookupError:
            continue
        found |= {tid for tid, st in states.items() if st.running or st.nr in accept_nrs}
    return found


class Backstop:
    """State of the backstop for the document: not used (tracepoint is the primary hook), attached
    (waiting for `pending` threads), retired (detached), or kept (cannot tell when to retire it)."""

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
        """Retire the backstop once no thread is left in an accept() begun before attach."""
        if self.state != "attached" or self.probes.backstop_pending() > 0:
            return
        self.probes.retire_backstop()
        self.state = "retired"
        self.retired_after_s = round(now - self.started, 3)
        print(
            f"accept-watch: syscall-exit backstop detached after {self.retired_after_s:.1f} s "
            f"({self.pending_at_attach} accept() calls in progress at attach had returned)",
            file=sys.stderr,
        )

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"state": self.state, "pending_at_attach": self.pending_at_attach,
                               "retired_after_s": self.retired_after_s}
        if self.reason:
            doc["reason"] = self.reason
        return doc
