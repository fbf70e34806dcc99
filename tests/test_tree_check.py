"""watch.TreeCheck: when the daemon re-scans the master's process tree (pure logic, real /proc)."""

from __future__ import annotations

import os
import subprocess

from accept_watch.daemon import discovery, watch
from accept_watch.probes.records import KernelSnapshot, WorkerCounters


def _topology(*pids: int) -> discovery.Topology:
    procs = {pid: discovery.ProcessInfo(pid, 1, "x", 0.0, "master" if i == 0 else "worker")
             for i, pid in enumerate(pids)}
    return discovery.Topology(master_pid=pids[0], master_cmdline="x", processes=procs, listeners=[])


def _snapshot(*worker_pids: int) -> KernelSnapshot:
    workers = tuple(WorkerCounters(pid, 80, 1, 0, 0, 0, 0, 0) for pid in worker_pids)
    return KernelSnapshot(0, workers, {}, (), {}, {})


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no /proc entry (pid reuse within the test is vanishingly unlikely)


def test_scans_on_schedule_not_in_between() -> None:
    me = os.getpid()
    check = watch.TreeCheck(_topology(me))
    t0 = 1e9  # "now" values far in the future of the constructor's monotonic clock are all due
    check.scanned(0.0, _topology(me), _snapshot(me))
    assert not check.due(1.0, _snapshot(me))  # before the first check
    assert not check.due(watch.CHECK_EVERY_S, _snapshot(me))  # checked: nothing changed
    assert check.due(watch.REFRESH_EVERY_S, _snapshot(me))  # the periodic full scan
    assert check.due(t0, _snapshot(me))


def test_unknown_accepting_pid_triggers_a_scan_at_the_next_check() -> None:
    me = os.getpid()
    check = watch.TreeCheck(_topology(me))
    check.scanned(0.0, _topology(me), _snapshot(me))
    newcomer = _gone_pid()
    assert not check.due(1.0, _snapshot(me, newcomer))  # between checks: wait
    assert check.due(watch.CHECK_EVERY_S, _snapshot(me, newcomer))


def test_a_vanished_process_triggers_a_scan_but_an_exited_known_worker_does_not_keep_doing_so() -> None:
    me, gone = os.getpid(), _gone_pid()
    check = watch.TreeCheck(_topology(me, gone))
    check.scanned(0.0, _topology(me, gone), _snapshot(me, gone))
    assert check.due(watch.CHECK_EVERY_S, _snapshot(me, gone))
    # The re-scan no longer finds it; the kernel still has its counters: no more scans for it.
    check.scanned(watch.CHECK_EVERY_S, _topology(me), _snapshot(me, gone))
    assert not check.due(2 * watch.CHECK_EVERY_S, _snapshot(me, gone))
