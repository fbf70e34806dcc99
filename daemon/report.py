"""`accept-watch report FILE.json [--html OUT.html] [--json]`: the "why" of an export, without root.

The analysis is recomputed from the export's counts and accept sequence (daemon/analysis.py), so a
report always says what this version of accept-watch concludes; a differing verdict stored in the
export is pointed out, not silently replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import analysis, terminal
from .report_html import render_html

REQUIRED_KEYS = ("master_pid", "probe", "total_accepts", "lost_events", "workers", "listeners")


class ReportError(Exception):
    """One-line reason the export cannot be reported on."""


def load_export(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except OSError as exc:
        raise ReportError(f"{path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise ReportError(f"{path}: not an accept-watch export (a JSON object is expected)")
    schema = doc.get("schema")
    if schema != "accept-watch/1":
        raise ReportError(f"{path}: schema {schema!r} is not 'accept-watch/1'")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ReportError(f"{path}: missing key(s) {', '.join(missing)}")
    if not isinstance(doc["workers"], list) or not isinstance(doc["listeners"], list):
        raise ReportError(f"{path}: 'workers' and 'listeners' must be lists")
    return doc


def recompute(doc: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The analysis of this export, and a warning when the stored verdict differs."""
    stored = doc.get("analysis") or {}
    wait_modes = {int(pid): wm for pid, wm in ((stored.get("wait_modes") or {}).get("by_pid") or {}).items()}
    try:
        fresh = analysis.analyze(doc, wait_modes or None)
    except ValueError as exc:
        raise ReportError(f"cannot analyze the export: {exc}") from None
    old = (stored.get("verdict") or {}).get("sentence")
    new = (fresh.get("verdict") or {}).get("sentence")
    warning = None
    if old and new and old != new:
        warning = f"the export's stored verdict differs from this version's: {old!r}"
    return fresh, warning


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def summary(doc: dict[str, Any], result: dict[str, Any], width: int = 100) -> str:
    shown = dict(doc, analysis=result)
    lines = [terminal.render(shown, width=width, max_workers=64, ansi=False), ""]
    fair = result.get("fairness") or {}
    lines.append(
        "fairness: "
        f"Jain {_fmt(fair.get('jain'))}  max/mean {_fmt(fair.get('max_mean_ratio'))}  "
        f"CV {_fmt(fair.get('cv'))}  Gini {_fmt(fair.get('gini'))}  "
        f"chi-square p {_fmt(fair.get('chi2_p'))} (even split)"
    )
    verdict = result.get("verdict") or {}
    lines.append(f"verdict: {verdict.get('pattern', '?')} (confidence {verdict.get('confidence', '?')})")
    inflight = [w for w in doc["workers"] if (w.get("inflight") or {}).get("max", 0) > 1]
    for w in sorted(inflight, key=lambda w: -w["inflight"]["max"])[:8]:
        inf = w["inflight"]
        lines.append(f"in-flight: pid {w['pid']} held up to {inf['max']} connections, "
                     f"{inf.get('busy_accepts', 0)} accepted while busy")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ReportError(f"cannot write {path}: directory does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ReportError(f"cannot write {path}: {exc.strerror}") from None


def run_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="accept-watch report",
        description="Summarize an accept-watch export: verdict, fairness figures, per-worker table.",
    )
    p.add_argument("export", type=Path, help="a JSON file written by accept-watch --export")
    p.add_argument("--html", type=Path, metavar="OUT.html", help="also write a self-contained HTML report")
    p.add_argument("--json", action="store_true", help="print the recomputed analysis as JSON")
    args = p.parse_args(argv)
    try:
        doc = load_export(args.export)
        result, warning = recompute(doc)
        if warning:
            print(f"accept-watch report: warning: {warning}", file=sys.stderr)
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            print(summary(doc, result))
        if args.html:
            write_atomic(args.html, render_html(doc, result))
            print(f"accept-watch report: HTML written to {args.html}", file=sys.stderr)
    except ReportError as exc:
        print(f"accept-watch report: error: {exc}", file=sys.stderr)
        return 2
    return 0
