"""What the dashboard reads from: the daemon (or a synthetic stand-in) implements this."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class DashboardSource(Protocol):
    def snapshot(self) -> dict:
        """The full accept-watch/1 document as its JSON dict (daemon/document.py); treat it as read-only."""
        ...

    def recent_events(self, limit: int) -> list[dict]:
        """Up to `limit` recent per-connection events, newest last; [] when the stream is off."""
        ...
