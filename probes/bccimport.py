"""Finding BCC's Python module: the distribution's (Debian/Ubuntu python3-bpfcc), never PyPI's.

BCC's Python bindings are not on PyPI (the PyPI project named "bcc" is unrelated), so an installed
wheel relies on the system's. A virtual environment made with --system-site-packages (or
`pipx install --system-site-packages`) imports it normally. A plain one (pipx's default) cannot
see /usr/lib/python3/dist-packages; then, and only then, the `bcc` package alone is loaded from
there (not the whole directory: other system modules could shadow the environment's own). The
bindings are pure Python over libbcc.so, so they work with any Python 3 of the system. `how` says
which way was taken; `accept-watch doctor` shows it.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
from pathlib import Path
from types import ModuleType

SYSTEM_BCC = Path(os.environ.get("ACCEPT_WATCH_SYSTEM_BCC", "/usr/lib/python3/dist-packages/bcc"))


class BccMissing(Exception):
    """One line: why BCC's Python module could not be loaded."""


def _trusted(path: Path) -> str | None:
    """Why root must not load code from `path`, or None. Debian's files: root-owned, not a symlink,
    not writable by group or others (a root process executing them must not run someone else's code)."""
    try:
        st = path.lstat()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid != 0 or st.st_mode & 0o022:
        return f"{path} is not owned by root or is writable by others"
    return None


def _load_system_bcc(directory: Path) -> ModuleType:
    init = directory / "__init__.py"
    for path in (directory.parent, directory, init):
        if reason := _trusted(path):
            raise BccMissing(f"not loading the system bcc: {reason}")
    spec = importlib.util.spec_from_file_location("bcc", init, submodule_search_locations=[str(directory)])
    if spec is None or spec.loader is None:
        raise BccMissing(f"cannot load {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # libbcc.so missing or broken: say so in one line
        del sys.modules["bcc"]
        raise BccMissing(f"{init} failed to load: {type(exc).__name__}: {exc}") from exc
    return module


def import_bcc() -> tuple[ModuleType, str]:
    """(the bcc module, how it was found). Raises BccMissing with one line of why not."""
    loaded = sys.modules.get("bcc")
    if loaded is not None and getattr(loaded, "BPF", None) is not None:
        return loaded, f"imported from {Path(loaded.__file__ or '?').parent}"
    try:
        import bcc
    except ImportError:
        bcc = None
    if bcc is not None:
        where = Path(bcc.__file__ or "?").parent
        if getattr(bcc, "BPF", None) is None:
            raise BccMissing(f"the 'bcc' module at {where} is not BCC (PyPI's unrelated 'bcc'? uninstall it)")
        return bcc, f"imported from {where}"
    if (SYSTEM_BCC / "__init__.py").exists():
        return _load_system_bcc(SYSTEM_BCC), (
            f"loaded from {SYSTEM_BCC} (this Python environment does not see system site-packages)")
    raise BccMissing("BCC's Python module is not installed (Debian/Ubuntu package python3-bpfcc)")
