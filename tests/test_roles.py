"""Roles from evidence (daemon/roles.py) and following a server whose master goes away
(daemon/discovery.py: resolve_master, find_successor, read_pidfile, pid_alive), on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from accept_watch.daemon import discovery, waitmode
from accept_watch.daemon.roles import assign_roles

# A gunicorn-shaped server: the master holds the listener and sleeps in select() on a pipe; two
# workers block in accept(); a helper holds no listener (closes it) and reads a pipe, like
# multiprocessing's resource_tracker; a "handler" child keeps the listener but never waits on it,
# like ForkingTCPServer's per-connection children.
SERVER = r"""
import os, select, socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
r, w = os.pipe()
kids = []
for role in ("worker", "worker", "helper", "handler"):
    pid = os.fork()
    if pid == 0:
        if role == "worker":
            while True:
                c, _ = s.accept(); c.close()
        if role == "helper":
            s.close(); os.read(r, 1)
        time.sleep(600)
    kids.append((role, pid))
print(" ".join(f"{role}:{pid}" for role, pid in kids), flush=True)
select.select([r], [], [])
"""


@contextmanager
def server() -> Iterator[tuple[int, dict[str, list[int]]]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        kids: dict[str, list[int]] = {}
        for item in proc.stdout.readline().split():
            role, pid = item.split(":")
            kids.setdefault(role, []).append(int(pid))
        time.sleep(0.3)  # every child reaches its waiting syscall
        yield proc.pid, kids
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _roles(topology: discovery.Topology) -> dict[int, str]:
    modes = waitmode.detect_wait_modes(list(topology.processes), set(topology.inodes))
    ppids = {p: i.ppid for p, i in topology.processes.items()}
    return assign_roles(ppids, topology.holders, topology.master_pid, set(), modes)


@pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' memory and fd tables (root)")
def test_roles_from_what_each_process_waits_on() -> None:
    with server() as (master, kids):
        topo = discovery.discover(master)
        roles = _roles(topo)
    assert roles[master] == "master"
    assert [roles[p] for p in kids["worker"]] == ["worker", "worker"]
    assert roles[kids["helper"][0]] == "helper"
    assert roles[kids["handler"][0]] == "helper"


def test_a_process_that_accepted_is_a_worker_and_a_holder_parent_of_workers_is_a_master() -> None:
    ppids = {10: 1, 11: 10, 12: 11, 13: 11, 14: 10}
    roles = assign_roles(ppids, {10, 11, 12, 13}, 10, {12, 13}, {})
    assert roles == {10: "master", 11: "master", 12: "worker", 13: "worker", 14: "helper"}


@pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' fd tables (root)")
def test_a_worker_pid_is_resolved_to_its_master() -> None:
    with server() as (master, kids):
        got, note = discovery.resolve_master(kids["worker"][0])
        assert got == master
        assert note is not None and f"worker of pid {master}" in note
        assert discovery.resolve_master(master) == (master, None)


# A binary upgrade caught half-way (nginx USR2, gunicorn USR2): the new master is still a child of the
# old one, holds the same listener, and has a worker of its own.
UPGRADE = r"""
import os, socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
new = os.fork()
if new == 0:
    worker = os.fork()
    if worker == 0:
        while True:
            c, _ = s.accept(); c.close()
    print(f"{os.getpid()} {worker}", flush=True)
    time.sleep(600)
time.sleep(600)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' fd tables (root)")
def test_a_new_generation_master_is_named_as_such_not_as_a_worker() -> None:
    proc = subprocess.Popen([sys.executable, "-c", UPGRADE], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        new_master, worker = map(int, proc.stdout.readline().split())
        got, note = discovery.resolve_master(new_master)
        assert got == proc.pid
        assert note is not None and "is a master started by" in note and "worker" not in note
        got, note = discovery.resolve_master(worker)
        assert got == proc.pid and note is not None and f"worker of pid {proc.pid}" in note
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' fd tables (root)")
def test_successor_is_the_surviving_top_of_the_tree() -> None:
    with server() as (master, kids):
        topo = discovery.discover(master)
        os.kill(master, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while discovery.pid_alive(master) and time.monotonic() < deadline:
            time.sleep(0.02)
        # Zombie until its parent (this test) reaps it: not alive either way.
        assert not discovery.pid_alive(master)
        successor = discovery.find_successor(topo)
        # The children were re-parented; each holds the socket, none is above another: the oldest.
        assert successor in kids["worker"] + kids["handler"]


def test_pidfile_is_read_bounded_and_strictly(tmp_path) -> None:
    f = tmp_path / "server.pid"
    f.write_text("4242\n")
    assert discovery.read_pidfile(str(f)) == 4242
    f.write_text("not a pid")
    assert discovery.read_pidfile(str(f)) is None
    f.write_text("1" * 100)
    assert discovery.read_pidfile(str(f)) is None
    assert discovery.read_pidfile(str(tmp_path / "missing.pid")) is None
    assert discovery.pid_alive(os.getpid()) and not discovery.pid_alive(2**22 + 1)
