"""How root writes files (export, events, HTML report) without being turned against the machine.

accept-watch runs as root next to users who control shared directories such as /tmp. The rules:
- the path's last component is never followed when it is a symbolic link, and never replaced when it
  is not a regular file (device, FIFO, socket, directory): `--export /dev/null` is refused, and so is a
  symlink planted where the file will go;
- in a sticky world-writable directory (/tmp), a file owned by another user is refused: its owner could
  swap it between our check and our write;
- new files: exports and reports 0644 (minus the umask; they are meant to be read), event logs 0600
  (they hold client addresses);
- every check is repeated when writing (the path may have been swapped since the start), and every
  failure is one line naming the path and the real reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

EXPORT_MODE = 0o644
EVENTS_MODE = 0o600
# Filesystems that hold no regular files of ours: writing there fails with misleading errors (ENOENT).
PSEUDO_FS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "bpf",
                       "configfs", "pstore", "devpts", "efivarfs", "fusectl", "binfmt_misc", "mqueue"})


class ExportError(Exception):
    """One-line reason why an output file cannot be written."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISLNK, "a symbolic link"))


def kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def reason(exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return "file name too long (255 bytes per name, 4096 per path)"
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link (not followed)"
    return exc.strerror.lower() if exc.strerror else str(exc)


def pseudo_fs(path: Path) -> str | None:
    """The type of the pseudo-filesystem (proc, sysfs...) that `path` lies on, if any."""
    try:
        target = os.path.realpath(path)
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    best = ("", "")
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype)
    return best[1] if best[1] in PSEUDO_FS else None


def _refuse_existing(p: Path, st: os.stat_result, prefix: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        what = kind(st.st_mode)
        hint = "; not followed" if stat.S_ISLNK(st.st_mode) else ", not a regular file; not replaced"
        raise ExportError(f"{prefix}: it is {what}{hint}")
    _refuse_foreign_in_sticky(p, st, prefix)


def _refuse_foreign_in_sticky(p: Path, st: os.stat_result, prefix: str) -> None:
    try:
        parent = os.stat(p.parent)
    except OSError:
        return
    sticky_shared = parent.st_mode & stat.S_ISVTX and parent.st_mode & stat.S_IWOTH
    if sticky_shared and st.st_uid != os.geteuid():
        raise ExportError(f"{prefix}: it belongs to uid {st.st_uid} in the shared directory {p.parent}; "
                          "not written (pick a path of your own)")


def check_output(path: str | os.PathLike[str], what: str = "export") -> None:
    """Refuse an output path up front (before any probe is attached): the safety rules above, then a
    real trial (creating a file next to it), since permission bits say nothing about read-only mounts."""
    p = Path(path)
    prefix = f"cannot write {what} to {p}"
    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        st = None  # the parent checks below say what is wrong
    except OSError as exc:
        raise ExportError(f"{prefix}: {reason(exc)}") from None
    if st is not None:
        _refuse_existing(p, st, prefix)
    parent = p.parent
    if not parent.exists():
        # An ancestor that is a regular file also makes the parent "not exist": say which.
        blocker = next((a for a in parent.parents if a.exists() and not a.is_dir()), None)
        if blocker is not None:
            raise ExportError(f"{prefix}: {blocker} is not a directory")
        raise ExportError(f"{prefix}: directory does not exist")
    if not parent.is_dir():
        raise ExportError(f"{prefix}: {parent} is not a directory")
    fstype = pseudo_fs(parent)
    if fstype is not None:
        raise ExportError(f"{prefix}: {parent} is on a {fstype} pseudo-filesystem, "
                          "which holds no files of ours")
    if st is not None and not os.access(p, os.W_OK):
        raise ExportError(f"{prefix}: permission denied")
    try:
        fd, trial = tempfile.mkstemp(dir=parent, prefix=f".{p.name[:200]}.", suffix=".check")
    except OSError as exc:
        raise ExportError(f"{prefix}: {reason(exc)}") from None
    os.close(fd)
    os.unlink(trial)


def write_atomic(path: str | os.PathLike[str], text: str, what: str = "export",
                 mode: int = EXPORT_MODE) -> None:
    """Readers never see a half-written file: temp file (O_EXCL, ours) in the same directory, fsync,
    rename. The target is checked again right before the rename: rename() replaces the directory entry
    itself, so a symlink or device swapped in since the start would be destroyed, not written through."""
    p = Path(path)
    prefix = f"cannot write {what} to {p}"
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name[:200]}.", suffix=".tmp")
    except OSError as exc:
        raise ExportError(f"{prefix}: {reason(exc)}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), mode & ~umask)
            os.fsync(f.fileno())
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            st = None
        if st is not None:
            _refuse_existing(p, st, prefix)
        os.rename(tmp, p)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ExportError(f"{prefix}: {reason(exc)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_events_file(path: str | os.PathLike[str]) -> int:
    """An fd for appending to the event log: never through a symlink (O_NOFOLLOW), never a FIFO or
    device (O_NONBLOCK so opening a FIFO cannot hang, then fstat), new files 0600."""
    p = Path(path)
    prefix = f"cannot write events to {p}"
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(p, flags, EVENTS_MODE)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO without a reader
            raise ExportError(f"{prefix}: it is a FIFO, not a regular file; not written") from None
        raise ExportError(f"{prefix}: {reason(exc)}") from None
    try:
        st = os.fstat(fd)
        _refuse_existing(p, st, prefix)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
