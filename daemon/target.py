"""What a pid given as a server's master must not be, checked before discovery looks at its tree.

Discovery takes a master and all its descendants as the server. Some pids make that wrong rather than
empty: pid 1 (init: every process of the machine descends from it, so every listening socket on the
host would be counted as one "server"), a kernel thread (no fd table, no user-space server), a thread
id of a process (/proc answers for it as if it were a process, and its "children" are the whole
process's). Each gets a one-line reason. A unix-socket-only server gets a line saying so, rather than
the bare "no listening TCP socket".
"""

from __future__ import annotations

import os

PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread
_UNIX_ACCEPTCON = 0x00010000  # /proc/net/unix "Flags" column: __SO_ACCEPTCON, a listening socket


class TargetError(Exception):
    """One-line reason why this pid cannot be a server's master."""


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses): field 3 on."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].decode("ascii", "replace").split()


def _tgid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f.read(8192).splitlines():
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_master(pid: int) -> None:
    """Raise TargetError when `pid` cannot be a server's master (see the module docstring). A pid that
    does not exist passes: the caller says so in its own words."""
    if pid == 1:
        raise TargetError("pid 1 is the init process (every process descends from it): give the pid of "
                          "the server's master process, not init")
    fields = _stat_fields(pid)
    if fields is None:
        return
    try:
        flags = int(fields[6])  # field 9 of /proc/PID/stat
    except (IndexError, ValueError):
        flags = 0
    if flags & PF_KTHREAD:
        raise TargetError(f"pid {pid} is a kernel thread, not a server process")
    tgid = _tgid(pid)
    if tgid is not None and tgid != pid:
        raise TargetError(f"pid {pid} is a thread of process {tgid}, not a process: give the process id "
                          f"(pid {tgid}, or its server's master)")


def unix_listeners(pids: list[int]) -> int:
    """How many listening unix sockets these processes hold (0 when none or unreadable): said when a
    server has no TCP listener, so that "nothing to count" names the reason."""
    inodes: set[int] = set()
    for pid in pids[:4096]:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if link.startswith("socket:[") and link.endswith("]") and link[8:-1].isdigit():
                inodes.add(int(link[8:-1]))
    if not inodes or not pids:
        return 0
    try:
        with open(f"/proc/{pids[0]}/net/unix") as f:
            lines = f.read(1 << 24).splitlines()[1:]
    except OSError:
        return 0
    found = 0
    for line in lines:
        parts = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]
        if len(parts) >= 7 and parts[6].isdigit() and int(parts[6]) in inodes:
            try:
                if int(parts[3], 16) & _UNIX_ACCEPTCON:
                    found += 1
            except ValueError:
                continue
    return found
