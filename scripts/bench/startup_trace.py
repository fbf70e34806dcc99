"""Runs accept-watch's CLI with a timestamp at each startup phase, for scripts/bench_startup.py.

Usage: python startup_trace.py OUT.json [SITE_DIR] -- accept-watch arguments...

Nothing is imported ahead of the CLI (that would move import time out of the phase it belongs to):
functions are wrapped as their modules appear in sys.modules, checked after every import statement.
Times are CLOCK_MONOTONIC (system-wide), so the parent subtracts its own launch time. The phases
are written at exit; a phase that never ran is absent.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()

import builtins  # noqa: E402 - after the first timestamp on purpose
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

# module -> attribute paths to time ("Class.method" for methods); every call is recorded. Names one
# version lacks (the before/after versions differ) are skipped.
WRAP: dict[str, tuple[str, ...]] = {
    "accept_watch.daemon.discovery": ("resolve_master", "discover"),
    "accept_watch.probes.environment": ("require_privileges", "require_btf", "ensure_tracing_mounts"),
    "accept_watch.probes.offsets": ("load_layout",),
    "accept_watch.probes.kernel": ("generate_program", "manual_attach_bpf",
                                   "release_compiler_memory", "AcceptProbes.compile",
                                   "AcceptProbes._wait_compiled", "AcceptProbes.attach",
                                   "AcceptProbes._try_primary",
                                   "AcceptProbes.snapshot"),
    "accept_watch.daemon.watch": ("WaitModes.__init__", "_bind_dashboard", "_start_dashboard"),
    "accept_watch.daemon.stats": ("Aggregator.__init__",),
}
calls: list[tuple[str, float, float]] = []
marks: dict[str, float] = {"trace_start": STARTED}
_done: set[str] = set()


def _timed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            calls.append((name, t0, time.monotonic()))
    return wrapper


def _patch_new() -> None:
    for mod_name, attrs in WRAP.items():
        mod = sys.modules.get(mod_name)
        if mod_name in _done or mod is None or not hasattr(mod, attrs[0].split(".")[0]):
            continue  # absent, or still executing (its functions not defined yet)
        _done.add(mod_name)
        marks[f"imported {mod_name.rsplit('.', 1)[-1]}"] = time.monotonic()
        for attr in attrs:
            owner: Any = mod
            *path, last = attr.split(".")
            for part in path:
                owner = getattr(owner, part, None)
            if owner is not None and hasattr(owner, last):
                setattr(owner, last, _timed(attr, getattr(owner, last)))


_real_import = builtins.__import__


def _import(*args: Any, **kwargs: Any) -> Any:
    module = _real_import(*args, **kwargs)
    if len(_done) < len(WRAP):
        _patch_new()
    return module


class _Stderr:
    """Marks when the 'attached' line is written (what the benchmark's clock stops on)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        if "attached in" in text and "attached_line" not in marks:
            marks["attached_line"] = time.monotonic()
        return self._inner.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def main() -> int:
    out = sys.argv[1]
    rest = sys.argv[2:]
    split = rest.index("--")
    if split:  # a site directory that holds another version's accept_watch package (before.py)
        sys.path.insert(0, rest[0])
    sys.argv = ["accept-watch", *rest[split + 1:]]
    builtins.__import__ = _import
    sys.stderr = _Stderr(sys.stderr)
    try:
        from accept_watch.daemon import cli
        marks["imported cli"] = time.monotonic()
        return cli.main()
    finally:
        marks["exit"] = time.monotonic()
        with open(out, "w") as f:
            json.dump({"marks": marks, "calls": calls}, f)


if __name__ == "__main__":
    sys.exit(main())
