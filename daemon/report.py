"""`accept-watch report FILE.json [--html OUT.html] [--json]`: the "why" of an export, without root.

The analysis is recomputed from the export's counts and accept sequence (daemon/analysis.py), so a
report always says what this version of accept-watch concludes; a stored verdict that differs is
pointed out (one warning line on stderr), not silently replaced. How workers waited (epoll, accept...)
cannot be re-measured from a file, so the wait modes stored in the export are fed back in.

Bad input (missing file, not JSON, another schema, missing or mistyped keys) is one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import stat
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from accept_watch.probes.records import degraded_lines

from . import analysis
from .document import SCHEMA_ID, Document, DocumentError
from .export import ExportError, check_writable, write_text_atomic
from .fmt import fmt_duration, fmt_fig, fmt_int, fmt_p, fmt_span, fmt_us
from .report_html import flag_messages, render_html
from .safefile import kind, reason
from .sanitize import clean, clean_doc
from .terminal import share_bar

SCHEMA = SCHEMA_ID
# Keys the daemon always writes and the report cannot do without (the model's required top-level keys).
REQUIRED_KEYS = tuple(f.alias or name for name, f in Document.model_fields.items()
                      if f.is_required() and name != "schema_")
PROG = "accept-watch report"
# Input bounds, far above any real export: numbers in one are counts, ns, us and seconds.
MAX_EXPORT_BYTES = 64 * 2**20
MAX_NUMBER = 2**63
MAX_DEPTH = 32


class ReportError(Exception):
    """One-line reason the export cannot be reported on."""


# ---------------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------------


def load_document(doc: Any) -> Document:
    """The parsed export as a Document (daemon/document.py); ReportError (one line naming the
    offending key) when it is not an accept-watch/1 export with everything the report reads. The
    sequence data is then read by analysis.analyze."""
    try:
        return Document.from_dict(doc)
    except DocumentError as exc:
        raise ReportError(str(exc)) from None


def validate_export(doc: Any) -> None:
    """Raise ReportError unless `doc` is an accept-watch/1 export (see load_document)."""
    load_document(doc)


def _read_bounded(path: Path) -> bytes:
    """The file's bytes, at most MAX_EXPORT_BYTES; only a regular file (/dev/zero or a FIFO would be
    read without end). O_NONBLOCK so that opening a FIFO cannot hang."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except OSError as exc:
        raise ReportError(f"{path}: {reason(exc)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ReportError(f"{path}: is {kind(st.st_mode)}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > MAX_EXPORT_BYTES:
            raise ReportError(f"{path}: {st.st_size:,} bytes, larger than an export can be "
                              f"({MAX_EXPORT_BYTES // 2**20} MiB)")
        try:
            data = f.read(MAX_EXPORT_BYTES + 1)
        except OSError as exc:
            raise ReportError(f"{path}: {reason(exc)}") from None
    if len(data) > MAX_EXPORT_BYTES:  # the file grew while being read
        raise ReportError(f"{path}: larger than an export can be ({MAX_EXPORT_BYTES // 2**20} MiB)")
    return data


def _check_numbers(value: Any, where: str = "", depth: int = 0) -> None:
    """Every number finite and within +-MAX_NUMBER, nesting at most MAX_DEPTH: what the views compute
    with (ns to s, us to ms, scales) then cannot overflow or recurse without end."""
    if depth > MAX_DEPTH:
        raise ReportError(f"{where or 'the document'}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int | float):
        if not math.isfinite(value) or abs(value) > MAX_NUMBER:
            raise ReportError(f"{where}: number out of range ({value!r:.40})")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(v, f"{where}.{k}" if where else str(k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_numbers(v, f"{where}[{i}]", depth + 1)


def _no_constant(name: str) -> Any:
    raise ReportError(f"not JSON ({name} is not a JSON number)")


def read_export(path: Path) -> Document:
    """Read an export (bounded) and load it through the model; every failure is a ReportError
    naming the file."""
    data = _read_bounded(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not JSON (not UTF-8 text)") from None
    try:
        doc = json.loads(text, parse_constant=_no_constant)
        _check_numbers(doc)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ReportError(f"{path}: not an accept-watch export (JSON nested too deeply)") from None
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from None
    try:
        return load_document(doc)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from None


def load_export(path: Path) -> dict[str, Any]:
    """read_export as the JSON dict the views render."""
    return read_export(path).to_dict()


def recompute(doc: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The analysis of this export, and a warning when the stored verdict differs from it."""
    stored = doc.get("analysis") or {}
    modes = stored.get("wait_modes")
    by_pid = modes.get("by_pid") if isinstance(modes, dict) else None
    if by_pid is not None and not isinstance(by_pid, dict):
        raise ReportError("analysis.wait_modes.by_pid must be an object")
    try:
        fresh = analysis.analyze(doc, by_pid or None)
    except (ValueError, ArithmeticError) as exc:
        raise ReportError(f"cannot analyze the export: {exc}") from None
    old = stored.get("verdict") if isinstance(stored.get("verdict"), dict) else {}
    new = fresh["verdict"]
    warning = None
    if old.get("sentence") and (old.get("sentence"), old.get("pattern")) != (new["sentence"], new["pattern"]):
        warning = (f"the export's stored verdict differs from this version's; stored: "
                   f"{old.get('pattern', '?')}: {' '.join(str(old['sentence']).split())}")
    return fresh, warning


# ---------------------------------------------------------------------------------------------------
# Terminal summary
# ---------------------------------------------------------------------------------------------------


class _Style:
    """Bold/red only on a terminal (and not with NO_COLOR); losses are also upper case with '!', so they
    stand out in a pipe or a log too."""

    def __init__(self, ansi: bool) -> None:
        self.ansi = ansi

    def __call__(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.ansi else text

    def bold(self, text: str) -> str:
        return self(text, "1")

    def loud(self, text: str) -> str:
        return self(text, "1;97;41")

    def warn(self, text: str) -> str:
        return self(text, "33")


def _wrap(text: str, width: int, indent: str) -> list[str]:
    # No breaks at hyphens: "12.3-12.8 %" must stay whole (and greppable).
    return textwrap.wrap(" ".join(text.split()), max(30, width), initial_indent=indent,
                         subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def _f3(v: float | None) -> str:  # the text report is ASCII: "-", not the HTML's "–"
    return fmt_fig(v, missing="-")


def _p(p: float | None) -> str:
    return fmt_p(p, missing="-")


def _n(v: int | None) -> str:
    return fmt_int(v, missing="-")


def summary(doc: Mapping[str, Any], result: Mapping[str, Any], width: int = 100, ansi: bool = False,
            source: str | None = None) -> str:
    """The terminal report: header, verdict, figures, flags, listeners, per-worker table."""
    st = _Style(ansi)
    width = max(60, width)
    # Every string of the export may come from the traced server (argv) or from whoever wrote the file.
    doc = clean_doc({k: v for k, v in doc.items() if k not in ("transitions", "rate_history")})
    result = clean_doc(result)
    source = None if source is None else clean(source)
    workers = sorted(doc["workers"], key=lambda w: w["pid"])
    lost, unattributed, total = doc["lost_events"], doc["unattributed"], doc["total_accepts"]
    out = [st.bold("accept-watch report") + (f"  {source}" if source else "")]
    out += _wrap(f"master {doc['master_pid']}  {doc.get('master_cmdline') or ''}", width, "")
    detail = f" ({doc['probe_detail']})" if doc.get("probe_detail") else ""
    out += _wrap(f"probe {doc['probe']}{detail}  kernel {doc.get('kernel') or '?'}", width, "")
    out.append(f"{'ran' if doc.get('ended_at') else 'running for'} {fmt_duration(doc['duration_s'])}  "
               f"{fmt_span(doc.get('started_at'), doc.get('ended_at'), arrow='->')}")
    lost_s = st.loud(f"LOST EVENTS {lost:,}!") if lost else "lost events 0"
    un_s = st.loud(f"UNATTRIBUTED {unattributed:,}!") if unattributed else "unattributed 0"
    out.append(st.bold(f"accepts {total:,}") + f"  {lost_s}  {un_s}")
    if unattributed:
        out.append(st.loud(f"!! {unattributed:,} accept(s) could not be attributed: "
                           "the counts are not exact"))
    if lost:
        out.append(st.warn(f"!  {lost:,} per-connection event(s) were lost (ring buffer full); "
                           "the counters stay exact"))
    out += [st.warn(f"!  {line}") for line in degraded_lines(doc.get("diagnostics"))]

    verdict = result["verdict"]
    fair = result["fairness"]
    out += ["", st.bold(f"verdict: {verdict['pattern']} ({verdict['confidence']} confidence)")]
    out += [st.bold(line) for line in _wrap(verdict["sentence"], width - 2, "  ")]
    df = f"df {fair['chi2_df']}, " if fair.get("chi2_df") else ""
    out.append(f"fairness: Jain {_f3(fair.get('jain'))}  max/mean {_f3(fair.get('max_mean_ratio'))}  "
               f"CV {_f3(fair.get('cv'))}  chi-square p {_p(fair.get('chi2_p'))} ({df}vs even split)  "
               f"Gini {_f3(fair.get('gini'))}")
    windows = [f"last {name[:-1]} s: Jain {_f3(win['jain'])}, max/mean {_f3(win.get('max_mean_ratio'))}"
               for name, win in sorted((fair.get("windows") or {}).items())
               if isinstance(win, dict) and win.get("jain") is not None]
    if windows:
        out.append("          " + "; ".join(windows))
    modes = {m: c for m, c in (result.get("wait_modes") or {}).get("counts", {}).items() if m != "unknown"}
    out.append("workers wait in: " + (", ".join(f"{m} ({c})" for m, c in sorted(modes.items()))
                                      if modes else "not recorded in this export"))
    for text in flag_messages(result):
        out += [st.warn(line) for line in _wrap(f"! {text}", width, "  ")]

    out += ["", st.bold(f"listeners ({len(doc['listeners'])})")]
    for lst in doc["listeners"]:
        qd = lst["queue_depth"]
        addr = str(lst.get("address") or "?")
        endpoint = f"[{addr}]:{lst['port']}" if ":" in addr else f"{addr}:{lst['port']}"
        near = qd.get("max") is not None and bool(qd.get("limit")) and qd["max"] >= 0.9 * qd["limit"]
        queue = f"queue max {_n(qd.get('max'))} / limit {_n(qd.get('limit'))} (now {_n(qd.get('current'))})"
        npids = len(lst["pids"])
        out.append(f"  {endpoint}  {lst['mode']}  {npids} pid{'s' if npids != 1 else ''}  "
                   f"accepts {lst['accepts']:,}  " + (st.loud(queue + "!") if near else queue))
    if not doc["listeners"]:
        out.append("  (none)")

    fair_share = analysis.competitors({"workers": workers, "analysis": result})["fair_share"]
    with_inflight = any(isinstance(w.get("inflight"), dict) for w in workers)
    out += ["", st.bold(f"workers ({len(workers)}; fair share "
                        f"{'-' if fair_share is None else f'{fair_share * 100:.1f} %'})")]
    head = (f"{'pid':>8} {'role':<6} {'accepts':>10} {'share':>7} {'wait p50':>8} {'p99':>8} {'max':>8} "
            f"{'state':<6}")
    if with_inflight:
        head += f" {'in-flight':>9} {'busy acc.':>9}"
    bar_w = min(30, width - len(head) - 2)
    if bar_w >= 8:
        head += "  share (| = fair)"
    out.append(head)
    top = max((w["share"] for w in workers), default=0.0)
    for w in workers:
        q = w.get("queue_wait_us") or {}
        line = (f"{w['pid']:>8} {str(w.get('role', 'worker'))[:6]:<6} {w['accepts']:>10,} "
                f"{w['share'] * 100:>6.1f}% {fmt_us(q.get('p50')):>8} {fmt_us(q.get('p99')):>8} "
                f"{fmt_us(q.get('max')):>8} {'alive' if w.get('alive', True) else 'exited':<6}")
        if with_inflight:
            inf = w.get("inflight") if isinstance(w.get("inflight"), dict) else {}
            line += f" {_n(inf.get('max')):>9} {_n(inf.get('busy_accepts')):>9}"
        if bar_w >= 8:
            line += "  " + share_bar(w["share"], top, fair_share, bar_w)
        out.append(line)
    if not workers:
        out.append("  (no workers)")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def check_output(path: Path) -> None:
    """Refuse an output path before any work is done (and before anything is printed); the same
    rules as the daemon's exports (daemon/safefile.py: no symlink, no device, no foreign file in /tmp)."""
    try:
        check_writable(path, "the HTML report")
    except ExportError as exc:
        raise ReportError(str(exc)) from None


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, rename: a reader never sees half a report."""
    try:
        write_text_atomic(path, text, "the HTML report")
    except ExportError as exc:
        raise ReportError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like every other error of this command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Summarize an accept-watch export: verdict, fairness figures, "
                "listeners, per-worker table. Needs no root.")
    p.add_argument("export", type=Path, metavar="FILE.json",
                   help="a JSON file written by accept-watch --export")
    p.add_argument("--html", type=Path, metavar="OUT.html", help="also write a self-contained HTML report")
    p.add_argument("--json", action="store_true", help="print the recomputed analysis as JSON instead")
    return p


def run_report(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.html:
            check_output(args.html)
        doc = load_export(args.export)
        result, warning = recompute(doc)
        if warning:
            print(f"{PROG}: warning: {clean(warning)}", file=sys.stderr)
        if args.json:
            try:
                text = json.dumps(result, indent=2, sort_keys=True, allow_nan=False)
            except ValueError as exc:  # a NaN or infinity would not be JSON
                raise ReportError(f"the analysis cannot be written as JSON: {exc}") from None
            print(text)
        else:
            ansi = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
            width = shutil.get_terminal_size((100, 24)).columns
            print(summary(doc, result, width=width, ansi=ansi, source=str(args.export)))
        if args.html:
            write_atomic(args.html, render_html(doc, result, [warning] if warning else []))
            print(f"{PROG}: HTML report written to {clean(args.html)}", file=sys.stderr)
    except ReportError as exc:
        print(f"{PROG}: error: {clean(exc)}", file=sys.stderr)
        return 2
    return 0
