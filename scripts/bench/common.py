"""What every part of `make bench` shares: the run settings, the log line, the quiet
check before each run."""

from __future__ import annotations

import datetime as dt
import sys
import time
from typing import Any

from .procstat import (
    busy_cores,
    loadavg,
)
from .servers import VENV_BIN

SETTLE_S = 1.0  # after a tool is ready and before the load: its first map read, the first poll
QUIET_CORES = 0.25  # before a run, the VM must be (nearly) idle: at most this many cores busy
DISTURBED_PCT = 10.0  # other processes using more than this % of a core during a run: redo the round
PY_SPY = VENV_BIN / "py-spy"


class BenchError(Exception):
    """A one-line reason the benchmark cannot go on."""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ the quiet check


def wait_quiet(max_wait_s: float) -> dict[str, Any]:
    """Wait until the VM is idle (other sessions may be running tests); give up after max_wait_s."""
    started = time.monotonic()
    busy = busy_cores(1.0)
    announced = False
    while busy > QUIET_CORES and time.monotonic() - started < max_wait_s:
        if not announced:
            log(f"waiting for the VM to be idle ({busy:.2f} cores busy; load {loadavg()[0]:.2f})")
            announced = True
        time.sleep(4.0)
        busy = busy_cores(1.0)
    waited = time.monotonic() - started - 1.0
    return {
        "busy_cores": round(busy, 2),
        "waited_s": round(max(0.0, waited), 1),
        "quiet": busy <= QUIET_CORES,
    }


# ------------------------------------------------------------------------------ count checking
