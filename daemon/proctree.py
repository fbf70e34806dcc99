"""The server's process tree, read from /proc and psutil: the master and its descendants, whether a pid
is alive, which socket inodes a process holds."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from .errors import DiscoveryError, denied


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    ppid: int
    cmdline: str
    create_time: float  # psutil's create_time (seconds since the epoch): tells a reused pid apart
    role: str  # "master" | "worker"


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited worker its master has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(512)
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2: stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"")


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets in pid's fd table (empty if the process exited meanwhile)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError):
        return set()
    except PermissionError:
        raise DiscoveryError(denied(f"reading {fd_dir}")) from None
    out: set[int] = set()
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except (FileNotFoundError, ProcessLookupError):
            continue  # fd closed (or process gone) while we were listing
        except PermissionError:
            raise DiscoveryError(denied(f"reading {fd_dir}")) from None
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _cmdline(proc: psutil.Process) -> str:
    try:
        parts = proc.cmdline()
    except psutil.ZombieProcess:
        parts = []
    return " ".join(parts) if parts else f"[{proc.name()}]"


def _info(proc: psutil.Process, role: str) -> ProcessInfo:
    with proc.oneshot():
        return ProcessInfo(
            pid=proc.pid, ppid=proc.ppid(), cmdline=_cmdline(proc), create_time=proc.create_time(), role=role
        )


def lookup_process(pid: int) -> ProcessInfo | None:
    """A process not found by discovery (e.g. forked between refreshes); None if it is gone."""
    try:
        return _info(psutil.Process(pid), "worker")
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        raise DiscoveryError(denied(f"to pid {pid}")) from None


def process_tree(master_pid: int) -> dict[int, ProcessInfo]:
    try:
        master = psutil.Process(master_pid)
        if master.status() == psutil.STATUS_ZOMBIE:
            raise DiscoveryError(f"pid {master_pid} has exited (a zombie not yet reaped by its parent)")
        procs = {master_pid: _info(master, "master")}
        children = master.children(recursive=True)
    except psutil.NoSuchProcess:
        raise DiscoveryError(f"no process with pid {master_pid}") from None
    except psutil.AccessDenied:
        raise DiscoveryError(denied(f"to pid {master_pid}")) from None
    for child in children:
        try:
            # A zombie is a worker that exited and has not been reaped yet: it accepts nothing.
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            procs[child.pid] = _info(child, "worker")
        except psutil.NoSuchProcess:
            continue  # a worker exiting right now (e.g. --max-requests): the next refresh settles it
        except psutil.AccessDenied:
            raise DiscoveryError(denied(f"to pid {child.pid}")) from None
    return procs
