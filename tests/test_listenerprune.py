"""serve's rule for deleting closed listeners' kernel entries (daemon/listenerprune.py): pure logic.
The kernel side (entries really deleted over 20 restarts) is in tests/test_serve_real.py."""

from __future__ import annotations

from accept_watch.daemon.listenerprune import ListenerPruner


def test_a_listener_held_by_a_target_is_never_due() -> None:
    p = ListenerPruner(retention_s=10)
    for now in (0, 100, 1000):
        assert p.due({1: 8000}, held_inodes=[1], held_ports=[8000], now=now) == (set(), set())


def test_a_closed_listener_is_due_after_the_retention_time_and_its_port_when_free() -> None:
    p = ListenerPruner(retention_s=10)
    kernel = {1: 8000, 2: 8000}  # 1: the old socket of a restarted server, 2: the new one
    assert p.due(kernel, [2], [8000], now=0) == (set(), set())
    assert p.due(kernel, [2], [8000], now=9.9) == (set(), set())
    # the port is still served (inode 2): only the listener entry goes
    assert p.due(kernel, [2], [8000], now=10) == ({1}, set())
    # the server gone for good: its last socket, then its port too
    assert p.due({2: 8000}, [], [], now=20) == (set(), set())
    assert p.due({2: 8000}, [], [], now=30) == ({2}, {8000})


def test_a_listener_that_comes_back_starts_over() -> None:
    p = ListenerPruner(retention_s=10)
    assert p.due({1: 80}, [], [], now=0) == (set(), set())
    assert p.due({1: 80}, [1], [80], now=5) == (set(), set())  # held again (a target back up)
    assert p.due({1: 80}, [], [], now=12) == (set(), set())  # gone since 12, not since 0
    assert p.due({1: 80}, [], [], now=22) == ({1}, {80})


def test_a_port_shared_with_a_kept_entry_is_not_due() -> None:
    p = ListenerPruner(retention_s=1)
    p.due({1: 80, 2: 80}, [], [], now=0)
    p.due({1: 80, 2: 80}, [2], [], now=0.5)  # 2 held again: its gone-time is forgotten
    assert p.due({1: 80, 2: 80}, [], [], now=1.0) == ({1}, set())  # 2 kept (gone since 1.0): port stays


def test_memory_only_for_entries_in_the_kernel_map() -> None:
    p = ListenerPruner(retention_s=100)
    for i in range(1000):
        p.due({i: 80}, [], [], now=i)
    assert len(p._gone_since) == 1
