"""KernelSnapshot.restricted: one read of the maps cut to a target (serve) or to --port (watch)."""

from __future__ import annotations

from accept_watch.probes.records import DiagCounter, KernelSnapshot, ListenerCounters, WorkerCounters


def _snapshot() -> KernelSnapshot:
    def worker(pid: int, port: int) -> WorkerCounters:
        return WorkerCounters(pid=pid, port=port, accepts=1, first_ns=1, last_ns=1, wait_count=0,
                              wait_sum_ns=0, wait_max_ns=0)

    return KernelSnapshot(
        taken_ns=5,
        workers=(worker(10, 80), worker(11, 80), worker(20, 90)),
        wait_hist={(10, 80): {3: 1}, (11, 80): {4: 1}, (20, 90): {5: 1}},
        listeners=(ListenerCounters(inode=1, port=80, accepts=2, depth_max=0, backlog_limit=128),
                   ListenerCounters(inode=2, port=90, accepts=1, depth_max=0, backlog_limit=128)),
        transitions={(80, 10, 11): 1, (80, 11, 10): 1, (90, 0, 20): 1},
        diag={c: 0 for c in DiagCounter} | {DiagCounter.EVENTS_LOST: 7},
    )


def test_restricted_by_port_keeps_that_port_only() -> None:
    part = _snapshot().restricted(lambda _pid, port: port == 90, lambda lst: lst.port == 90)
    assert [(w.pid, w.port) for w in part.workers] == [(20, 90)]
    assert part.wait_hist == {(20, 90): {5: 1}}
    assert [lst.inode for lst in part.listeners] == [2]
    assert part.transitions == {(90, 0, 20): 1}
    assert part.lost_events == 7 and part.taken_ns == 5  # shared by every target: whole


def test_restricted_by_pid_keeps_transitions_into_those_pids() -> None:
    part = _snapshot().restricted(lambda pid, _port: pid in {10}, lambda lst: lst.inode == 1)
    assert [w.pid for w in part.workers] == [10]
    assert part.wait_hist == {(10, 80): {3: 1}}
    assert [lst.inode for lst in part.listeners] == [1]
    assert part.transitions == {(80, 11, 10): 1}  # keyed by the pid that accepted, not the previous one
