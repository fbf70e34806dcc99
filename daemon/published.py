"""The latest analyzed document, which the views read while the run loop makes the next one.

The run loop is the only writer (publish(), once per update); the dashboard's threads read it through
the DashboardSource protocol (snapshot(), recent_events()). A document is never changed once
published, so readers share it without copying.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .document import Document


class PublishedDocument:
    def __init__(self, first: Document, events: Callable[[int], list[dict[str, Any]]] | None = None) -> None:
        """first: shown until the first publish(); events: the recent per-connection events
        (Aggregator.recent_events), or None when the stream is off."""
        self._lock = threading.Lock()
        self._doc = first
        self._events = events

    def publish(self, doc: Document) -> Document:
        with self._lock:
            self._doc = doc
        return doc

    def model(self) -> Document:
        with self._lock:
            return self._doc

    # -- DashboardSource -------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return self.model().to_dict()

    def recent_events(self, limit: int) -> list[dict[str, Any]]:
        return self._events(limit) if self._events is not None else []
