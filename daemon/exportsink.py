"""The `--export` file over a whole run: a failed write (disk full, I/O error) never ends the run.

A periodic write that fails is reported (stderr line, `export_errors` in the document, which the
dashboard shows and /metrics counts as accept_watch_export_failures_total) and simply tried again at
the next period. The final write is retried a few times; if it still fails, the document goes to a
fallback file in the temporary directory, or, failing that, to stderr, and the line saying so names it:
what was counted is never silently lost.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .export import write_json_atomic
from .safefile import ExportError, reason

FINAL_ATTEMPTS = 3
FINAL_PAUSE_S = 1.0


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ExportSink:
    def __init__(self, path: Path, on_change: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = path
        self.failures = 0
        self.last_error: str | None = None
        self.last_at: str | None = None
        self._on_change = on_change

    def to_doc(self) -> dict[str, Any]:
        return {"count": self.failures, "last_error": self.last_error, "last_at": self.last_at}

    def _failed(self, exc: ExportError) -> None:
        self.failures += 1
        self.last_error, self.last_at = str(exc), _now_iso()
        if self._on_change is not None:
            self._on_change(self.to_doc())

    def _write(self, doc: dict[str, Any]) -> None:
        # The document carries the failures so far (the aggregator's copy may be one period old).
        write_json_atomic(self.path, {**doc, "export_errors": self.to_doc()})

    def periodic(self, doc: dict[str, Any]) -> bool:
        try:
            self._write(doc)
        except ExportError as exc:
            self._failed(exc)
            print(f"accept-watch: warning: {exc} (failure {self.failures}; the run goes on, "
                  "retrying at the next export)", file=sys.stderr, flush=True)
            return False
        return True

    def final(self, doc: dict[str, Any], attempts: int = FINAL_ATTEMPTS,
              pause_s: float = FINAL_PAUSE_S) -> bool:
        """True when the document reached the export path; otherwise it was written elsewhere (named)."""
        for attempt in range(attempts):
            try:
                self._write(doc)
                return True
            except ExportError as exc:
                self._failed(exc)
                if attempt + 1 < attempts:
                    time.sleep(pause_s)
        text = json.dumps({**doc, "export_errors": self.to_doc()}, indent=1) + "\n"
        try:
            fallback = _write_fallback(text)
        except OSError as exc:
            print(f"accept-watch: error: {self.last_error} ({attempts} attempts); the fallback file failed "
                  f"too ({reason(exc)}): the document follows on stderr", file=sys.stderr, flush=True)
            sys.stderr.write(text)
            sys.stderr.flush()
            return False
        print(f"accept-watch: error: {self.last_error} ({attempts} attempts); the document was written to "
              f"{fallback} instead", file=sys.stderr, flush=True)
        return False


def _write_fallback(text: str) -> str:
    # mkstemp: O_EXCL, a name nobody could have planted, mode 0600.
    fd, name = tempfile.mkstemp(prefix="accept-watch-export-", suffix=".json", dir=tempfile.gettempdir())
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        os.unlink(name)
        raise
    return name
