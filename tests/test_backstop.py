"""When the syscall-exit backstop next to fexit/kretprobe is retired (daemon/backstop.py): pure logic,
with /proc and the probes replaced by fakes. The kernel side is proven by the kernel matrix's
fexit-blocked path (a server blocked in accept() before attach)."""

from __future__ import annotations

import pytest

from accept_watch.daemon import backstop
from accept_watch.daemon.backstop import Backstop, left_accept, threads_in_accept
from accept_watch.daemon.waitmode import SyscallState, syscall_table
from accept_watch.probes.records import ProbeKind

TABLE = syscall_table("x86_64")
ACCEPT, ACCEPT4, EPOLL_WAIT = 43, 288, 232


def _blocked(nr: int) -> SyscallState:
    return SyscallState(False, nr, (3, 0, 0, 0, 0, 0))


def test_threads_inside_accept_or_running_are_pending() -> None:
    states = {
        10: {10: _blocked(ACCEPT4), 11: _blocked(EPOLL_WAIT)},
        20: {20: SyscallState(True, None, ()), 21: _blocked(ACCEPT), 22: SyscallState(False, -1, ())},
    }

    def read(pid: int) -> dict[int, SyscallState]:
        if pid not in states:
            raise ProcessLookupError(pid)
        return states[pid]

    assert threads_in_accept([10, 20, 30], read, TABLE) == {10, 20, 21}


def test_threads_seen_out_of_accept_have_left_it() -> None:
    states = {1: _blocked(ACCEPT), 2: _blocked(EPOLL_WAIT), 3: SyscallState(True, None, ()),
              4: SyscallState(False, -1, ()), 5: None}
    assert left_accept(states, states.get, TABLE) == {2, 4, 5}


class FakeProbes:
    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.retired = 0

    def seed_backstop(self, tids: set[int]) -> None:
        self.pending |= set(tids)

    def backstop_pending(self) -> set[int]:
        return set(self.pending)

    def clear_backstop(self, tids: set[int]) -> None:
        self.pending -= set(tids)

    def retire_backstop(self) -> None:
        self.retired += 1


def _never_left(monkeypatch) -> None:
    monkeypatch.setattr(backstop, "left_accept", lambda tids: set())


def test_retired_once_every_pending_accept_has_returned(monkeypatch, capsys) -> None:
    _never_left(monkeypatch)
    monkeypatch.setattr(backstop, "threads_in_accept", lambda pids: {101, 102})
    probes = FakeProbes()
    b = Backstop(probes, ProbeKind.FEXIT, [100], started=50.0)
    assert probes.pending == {101, 102}
    assert b.to_doc() == {"state": "attached", "pending_at_attach": 2, "retired_after_s": None}
    probes.pending.discard(101)  # the kernel side removes a thread at its accept's exit
    b.check(51.0)
    assert probes.retired == 0 and b.state == "attached"
    probes.pending.discard(102)
    b.check(52.5)
    b.check(53.0)
    assert probes.retired == 1
    assert b.to_doc() == {"state": "retired", "pending_at_attach": 2, "retired_after_s": 2.5}
    assert "backstop switched off after 2.5 s (2 accept() calls" in capsys.readouterr().err


def test_a_running_thread_is_ticked_off_once_seen_elsewhere(monkeypatch) -> None:
    """A thread running at attach (a busy request thread, say) may never call accept() again: /proc
    showing it blocked anywhere else is enough."""
    seen: dict[int, SyscallState] = {7: SyscallState(True, None, ())}
    monkeypatch.setattr(backstop, "threads_in_accept", lambda pids: {7})
    monkeypatch.setattr(backstop, "left_accept", lambda tids: left_accept(tids, seen.get, TABLE))
    probes = FakeProbes()
    b = Backstop(probes, ProbeKind.FEXIT, [7], started=0.0)
    b.check(1.0)
    assert b.state == "attached"
    seen[7] = _blocked(EPOLL_WAIT)
    b.check(2.0)
    assert (b.state, probes.retired, probes.pending) == ("retired", 1, set())


def test_nothing_pending_retires_at_the_first_check(monkeypatch) -> None:
    monkeypatch.setattr(backstop, "threads_in_accept", lambda pids: set())
    probes = FakeProbes()
    b = Backstop(probes, ProbeKind.KRETPROBE, [100], started=0.0)
    b.check(1.0)
    assert probes.retired == 1 and b.state == "retired"


def test_tracepoint_primary_has_no_backstop() -> None:
    probes = FakeProbes()
    b = Backstop(probes, ProbeKind.TRACEPOINT, [100], started=0.0)
    b.check(1.0)
    assert probes.retired == 0
    assert b.to_doc() == {"state": "not used", "pending_at_attach": 0, "retired_after_s": None}


@pytest.mark.parametrize("error", [NotImplementedError("no syscall numbers for riscv64"),
                                   PermissionError("/proc/1/task/1/syscall")])
def test_kept_when_pending_accepts_cannot_be_known(monkeypatch, error: Exception) -> None:
    def fail(pids: object) -> set[int]:
        raise error

    monkeypatch.setattr(backstop, "threads_in_accept", fail)
    probes = FakeProbes()
    b = Backstop(probes, ProbeKind.FEXIT, [100], started=0.0)
    b.check(1.0)
    assert probes.retired == 0
    assert b.to_doc()["state"] == "kept" and str(error) in b.to_doc()["reason"]
