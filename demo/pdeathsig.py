"""Start a process that dies with its parent: the one PR_SET_PDEATHSIG helper of the demo, the tests and
the benchmark.

Run as a script (`python demo/pdeathsig.py PARENT_PID PROGRAM ARGS...`) it is an exec shim: it asks the
kernel to SIGTERM it when its parent thread dies (even by SIGKILL), then becomes PROGRAM, so a killed
test run, demo or benchmark leaves no server behind. PDEATHSIG survives execve for non-setuid binaries.
An exec shim rather than Popen(preexec_fn=...): preexec_fn is unsafe once the caller runs threads.
The benchmark, which cannot import this package (it runs from scripts/bench/), runs it by path (SHIM).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

SHIM = Path(__file__).resolve()
PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h


def spawn_with_pdeathsig(argv: Sequence[str], **popen_kwargs: object) -> subprocess.Popen[bytes]:
    """Popen(argv) whose process gets SIGTERM when this process's current thread dies."""
    shim = [sys.executable, str(SHIM), str(os.getpid()), *argv]
    return subprocess.Popen(shim, **popen_kwargs)  # type: ignore[call-overload]


def _exec(args: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(args[0]):  # the parent died before prctl took effect
        sys.exit(1)
    os.execv(args[1], args[1:])


if __name__ == "__main__":
    _exec(sys.argv[1:])
