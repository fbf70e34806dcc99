"""Live web dashboard, HTTP API and Prometheus metrics of accept-watch.

Names are imported lazily so that `accept_watch.dashboard.source` (the protocol the daemon implements)
does not pull in FastAPI and uvicorn for runs without a dashboard.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "accept_watch.dashboard.app",
    "DashboardServer": "accept_watch.dashboard.server",
    "DashboardError": "accept_watch.dashboard.server",
    "DashboardSource": "accept_watch.dashboard.source",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
