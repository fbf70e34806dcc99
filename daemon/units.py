"""A systemd unit's processes, read from its cgroup.

Where systemd runs (/run/systemd/system exists), `systemctl show` gives the unit's LoadState, MainPID
and ControlGroup; the cgroup's processes are read from cgroup.procs under every cgroup hierarchy that
systemd manages (the cgroup2 mount; in hybrid mode also the v1 `name=systemd` one). Where it does not
run (a container, this project's VMs), the unit's cgroup is looked for by name under those same
mounts (a bounded walk). Nothing here writes: reading cgroupfs through a path we built is harmless.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import deque
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
MAX_PROCS_BYTES = 1 << 20  # cgroup.procs read bounded: ~140 k pids
MAX_WALK_DIRS = 20000
MAX_WALK_DEPTH = 6
SYSTEMCTL_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class UnitState:
    known: bool  # the unit exists (systemd knows it, or a cgroup with its name exists)
    pids: tuple[int, ...]  # every process of its cgroup (and sub-cgroups), sorted
    main_pid: int | None  # systemd's MainPID, when systemd runs and says one
    where: str  # how it was found, for messages


def cgroup_roots(mountinfo: str) -> list[str]:
    """Mount points of the hierarchies systemd puts units in: cgroup2, and v1 with name=systemd."""
    roots: list[str] = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if not sep or len(fields) < 5 or len(after) < 3:
            continue
        fstype, options = after[0], after[2].split(",")
        point = fields[4].replace("\\040", " ")
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options):
            roots.append(point)
    # cgroup2 first: in hybrid mode both hold the unit, the unified one is systemd's own.
    return sorted(dict.fromkeys(roots), key=lambda r: 0 if "unified" in r or r == "/sys/fs/cgroup" else 1)


def find_unit_dirs(roots: list[str], unit: str, control_group: str | None = None) -> list[str]:
    """The unit's cgroup directory under each root: at ControlGroup when systemd named it, else the
    first directory called `unit` found breadth-first (depth and count bounded; symlinks not followed)."""
    found: list[str] = []
    for root in roots:
        if control_group:
            path = os.path.normpath(os.path.join(root, control_group.lstrip("/")))
            if path.startswith(root.rstrip("/") + "/") and os.path.isdir(path) and not os.path.islink(path):
                found.append(path)
            continue
        hit = _walk_for(root, unit)
        if hit is not None:
            found.append(hit)
    return found


def _walk_for(root: str, name: str) -> str | None:
    queue: deque[tuple[str, int]] = deque([(root, 0)])
    visited = 0
    while queue and visited < MAX_WALK_DIRS:
        path, depth = queue.popleft()
        visited += 1
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if not is_dir:
                continue
            if e.name == name:
                return e.path
            if depth + 1 < MAX_WALK_DEPTH:
                queue.append((e.path, depth + 1))
    return None


def read_procs(cgroup_dir: str, max_depth: int = 3) -> set[int]:
    """Pids in cgroup.procs of the directory and its sub-cgroups (a unit may delegate some)."""
    pids: set[int] = set()
    queue: deque[tuple[str, int]] = deque([(cgroup_dir, 0)])
    visited = 0
    while queue and visited < 1000:
        path, depth = queue.popleft()
        visited += 1
        try:
            with open(os.path.join(path, "cgroup.procs"), "rb") as f:
                raw = f.read(MAX_PROCS_BYTES)
        except OSError:
            continue
        pids.update(int(x) for x in raw.split() if x.isdigit() and 0 < int(x) < 1 << 22)
        if depth < max_depth:
            try:
                subdirs = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            queue.extend((d, depth + 1) for d in subdirs)
    return pids


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def parse_show(text: str) -> dict[str, str]:
    """`systemctl show -p A -p B UNIT` output: KEY=value lines."""
    out: dict[str, str] = {}
    for line in text.splitlines()[:64]:
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def systemctl_show(unit: str) -> dict[str, str] | None:
    try:
        proc = subprocess.run(["systemctl", "show", "-p", "LoadState", "-p", "MainPID", "-p", "ControlGroup",
                               "--", unit], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_show(proc.stdout) if proc.returncode == 0 else None


def resolve_unit(unit: str, mountinfo_path: str = MOUNTINFO, use_systemd: bool | None = None) -> UnitState:
    try:
        with open(mountinfo_path) as f:
            roots = cgroup_roots(f.read(1 << 20))
    except OSError:
        roots = []
    if use_systemd is None:
        use_systemd = systemd_running()
    if use_systemd:
        shown = systemctl_show(unit)
        if shown is not None:
            known = shown.get("LoadState", "") not in ("not-found", "")
            main = int(shown["MainPID"]) if shown.get("MainPID", "").isdigit() else 0
            dirs = find_unit_dirs(roots, unit, shown.get("ControlGroup") or None)
            pids = set().union(*(read_procs(d) for d in dirs)) if dirs else set()
            if main > 0:
                pids.add(main)
            return UnitState(known, tuple(sorted(pids)), main or None,
                             f"systemd (cgroup {dirs[0] if dirs else 'none'})")
    dirs = find_unit_dirs(roots, unit)
    if not dirs:
        return UnitState(False, (), None, "no cgroup named " + unit + " under " + (", ".join(roots) or "-"))
    pids = set().union(*(read_procs(d) for d in dirs))
    return UnitState(True, tuple(sorted(pids)), None, f"cgroup {dirs[0]}")
