"""The live terminal table, rendered from the snapshot document (a pure function: doc -> str).

Lines are built as styled segments and cut at the visible width, so ANSI codes never count towards
the width and a cut never splits an escape sequence.
"""

from __future__ import annotations

import textwrap
from typing import Any

from accept_watch.probes.records import degraded_lines

from .analysis import competitors, inflight_flagged
from .fmt import fmt_duration, fmt_us
from .sanitize import clean_doc

_STYLES = {
    "bold": "\x1b[1m", "loud": "\x1b[1;97;41m", "dim": "\x1b[2m", "yellow": "\x1b[33m", "red": "\x1b[31m",
}
_RESET = "\x1b[0m"
MAX_LISTENER_LINES = 8

# Fixed-width columns, then the bar last so it takes whatever width is left. Below FULL_WIDTH the
# rate and wait columns are dropped rather than cut mid-figure.
_COLS = "{pid:>8} {accepts:>10} {share:>6} {rate:>13} {p50:>8} {p99:>8}  {state:<6}  {bar}"
_COLS_COMPACT = "{pid:>8} {accepts:>10} {share:>6}  {state:<6}  {bar}"
MIN_BAR = 10
_FIXED = len(_COLS.format(pid="", accepts="", share="", rate="", p50="", p99="", state="", bar=""))
_FIXED_COMPACT = len(_COLS_COMPACT.format(pid="", accepts="", share="", state="", bar=""))
FULL_WIDTH = _FIXED + MIN_BAR
# Servers in containers: the pid each worker has inside its container (NSpid) next to the host pid,
# and one line per container (daemon/procident.py).
_PID_COL = "{pid:>8}"
_NSPID_COL = " {nspid:>7}"
MAX_CONTAINER_LINES = 4

Segment = tuple[str, str | None]


def _emit(segments: list[Segment], width: int, ansi: bool) -> str:
    out: list[str] = []
    left = width
    for text, style in segments:
        if left <= 0:
            break
        piece = text[:left]
        left -= len(piece)
        out.append(f"{_STYLES[style]}{piece}{_RESET}" if ansi and style else piece)
    return "".join(out).rstrip()


def _endpoint(lst: dict[str, Any]) -> str:
    addr = str(lst.get("address") or "?")
    return f"[{addr}]:{lst.get('port')}" if ":" in addr else f"{addr}:{lst.get('port')}"


def share_bar(share: float, max_share: float, fair: float | None, width: int) -> str:
    """'####....|..': the share scaled to the largest one, '|' at the fair share (live view, report)."""
    if max_share <= 0:
        cells = ["."] * width
    else:
        filled = round(share / max_share * width)
        cells = ["#"] * filled + ["."] * (width - filled)
    if fair is not None and max_share > 0:
        pos = min(width - 1, int(fair / max_share * width)) if fair <= max_share else None
        if pos is not None:
            cells[pos] = "|"
    return "".join(cells)


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _loud(name: str, n: int) -> Segment:
    """Losses must not be missed, with or without colour: upper case and '!' when non-zero."""
    return (f"{name.upper()} {n:,}!", "loud") if n else (f"{name} 0", None)


def _header(doc: dict[str, Any]) -> list[Segment]:
    lost = int(doc.get("lost_events") or 0)
    unattributed = int(doc.get("unattributed") or 0)
    # Totals and losses first: a narrow terminal cuts the end of the line, and losses must stay visible.
    segs: list[Segment] = [
        ("accept-watch", "bold"),
        (f"  total {int(doc.get('total_accepts') or 0):,}", "bold"),
        ("  ", None),
        _loud("lost", lost),
        ("  ", None),
        _loud("unattributed", unattributed),
        (f"  pid {doc.get('master_pid')}", None),
        (f"  probe {doc.get('probe')}", None),
        (f"  {'ran' if doc.get('ended_at') else 'elapsed'} {fmt_duration(doc.get('duration_s'))}", None),
    ]
    if doc.get("ended_at"):
        segs.append(("  [ended]", "dim"))
    segs.append((f"  {doc.get('master_cmdline', '')}", "dim"))
    return segs


def _listener_line(lst: dict[str, Any]) -> list[Segment]:
    qd = lst.get("queue_depth") or {}
    cur, mx, limit = qd.get("current"), qd.get("max"), qd.get("limit")
    near = bool(limit) and mx is not None and mx >= 0.9 * limit
    pids = lst.get("pids") or []
    state = "" if lst.get("open", True) else " (closed)"
    return [
        (f"  listen {_endpoint(lst)}{state} {lst.get('mode')} ({len(pids)} pid{_s(len(pids))})", None),
        (f"  queue {'-' if cur is None else cur}/{'-' if limit is None else limit}", None),
        (f" max {'-' if mx is None else mx}", "loud" if near else None),
        (f"  accepts {int(lst.get('accepts') or 0):,}", None),
    ]


def _worker_line(
    w: dict[str, Any], max_share: float, fair: float | None, bar_w: int, cols: str
) -> list[Segment]:
    rate = w.get("rate") or {}
    wait = w.get("queue_wait_us") or {}
    if w.get("role") in ("master", "helper"):
        state = str(w.get("role")) if w.get("alive", True) else "exited"
    else:
        state = "alive" if w.get("alive", True) else "exited"
    share = float(w.get("share") or 0.0)
    text = cols.format(
        pid=str(w.get("pid", "-")),
        nspid=str(w.get("nspid") if w.get("nspid") is not None else "-"),
        accepts=f"{int(w.get('accepts') or 0):,}",
        share=f"{share * 100:.1f}%",
        bar=share_bar(share, max_share, fair, bar_w),
        rate=f"{float(rate.get('1s') or 0):.1f}/{float(rate.get('10s') or 0):.1f}",
        p50=fmt_us(wait.get("p50")),
        p99=fmt_us(wait.get("p99")),
        state=state,
    )
    return [(text, None if state != "exited" else "dim")]


def render(doc: dict[str, Any], width: int = 100, max_workers: int = 32, ansi: bool = False) -> str:
    """The live table. Shows the max_workers busiest processes (in pid order) and counts the rest."""
    doc = _safe(doc)
    width = max(40, width)
    lines = [_emit(_header(doc), width, ansi)]
    listeners = doc.get("listeners") or []
    for lst in listeners[:MAX_LISTENER_LINES]:
        lines.append(_emit(_listener_line(lst), width, ansi))
    if len(listeners) > MAX_LISTENER_LINES:
        more = len(listeners) - MAX_LISTENER_LINES
        lines.append(_emit([(f"  ... {more} more listeners", "dim")], width, ansi))

    workers = doc.get("workers") or []
    if not workers:
        lines.append(_emit([("  (no workers)", "dim")], width, ansi))
        return "\n".join(lines)
    cols, fixed = (_COLS, _FIXED) if width >= FULL_WIDTH else (_COLS_COMPACT, _FIXED_COMPACT)
    if any(w.get("nspid") is not None for w in workers):
        cols = cols.replace(_PID_COL, _PID_COL + _NSPID_COL, 1)
        fixed += len(_NSPID_COL.format(nspid=""))
    lines.extend(_emit(segs, width, ansi) for segs in _container_lines(workers))
    bar_w = max(MIN_BAR, width - fixed)
    fair = competitors(doc)["fair_share"]
    max_share = max(float(w.get("share") or 0.0) for w in workers)
    head = cols.format(
        pid="pid", accepts="accepts", share="share",
        bar=f"{'share (| = fair ' + (f'{fair * 100:.1f}%' if fair else '-') + ')':<{bar_w}}"[:bar_w],
        rate="rate 1s/10s", p50="wait p50", p99="p99", state="state", nspid="ns pid",
    )
    lines.append(_emit([(head, "bold")], width, ansi))
    busiest = sorted(workers, key=lambda w: (-int(w.get("accepts") or 0), int(w.get("pid") or 0)))
    shown = busiest[: max(0, max_workers)]
    for w in sorted(shown, key=lambda w: int(w.get("pid") or 0)):
        lines.append(_emit(_worker_line(w, max_share, fair, bar_w, cols), width, ansi))
    rest = len(workers) - len(shown)
    if rest > 0:
        shown_pids = {w.get("pid") for w in shown}
        rest_accepts = sum(int(w.get("accepts") or 0) for w in workers if w.get("pid") not in shown_pids)
        lines.append(_emit([(f"  ... {rest} more workers ({rest_accepts:,} accepts)", "dim")], width, ansi))
    lines.extend(_emit([(text, style)], width, ansi) for text, style in _why_lines(doc, width))
    return "\n".join(lines)


def _container_lines(workers: list[dict[str, Any]]) -> list[list[Segment]]:
    """One line per container the server's processes run in (most processes first), bounded."""
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for w in workers:
        c = w.get("container")
        if isinstance(c, dict) and c.get("id"):
            key = (str(c.get("runtime")), str(c["id"]))
            n, _ = seen.get(key, (0, ""))
            seen[key] = (n + 1, str(c.get("cgroup") or ""))
    ordered = sorted(seen.items(), key=lambda kv: (-kv[1][0], kv[0]))
    out = [[(f"  container {runtime} {cid[:12]} ({n} pid{_s(n)})", None), (f"  cgroup {cgroup}", "dim")]
           for (runtime, cid), (n, cgroup) in ordered[:MAX_CONTAINER_LINES]]
    if len(ordered) > MAX_CONTAINER_LINES:
        out.append([(f"  ... {len(ordered) - MAX_CONTAINER_LINES} more containers", "dim")])
    return out


def _safe(doc: dict[str, Any]) -> dict[str, Any]:
    """Every string the table may show, sanitized (argv comes from the traced server's owner); the two
    long sequences it never shows are left out rather than copied."""
    safe = clean_doc({k: v for k, v in doc.items() if k not in ("transitions", "rate_history")})
    # Any field may be null where unknown: entries that are not objects are dropped, not crashed on.
    for key in ("workers", "listeners"):
        items = safe.get(key)
        safe[key] = [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []
    return safe


def _why_lines(doc: dict[str, Any], width: int) -> list[tuple[str, str | None]]:
    """The analysis under the table: verdict, how workers wait, in-worker queueing, flags."""
    analysis = doc.get("analysis") or {}
    out: list[tuple[str, str | None]] = []
    sentence = (analysis.get("verdict") or {}).get("sentence")
    if sentence:
        out += [(line, "bold") for line in textwrap.wrap(sentence, width - 2, initial_indent="  why: ",
                                                       subsequent_indent="       ")]
    if analysis.get("error"):
        out.append((f"  why: {analysis['error']}", "red"))
    counts = (analysis.get("wait_modes") or {}).get("counts") or {}
    waiting = {m: c for m, c in counts.items() if m != "unknown"}
    if waiting:
        modes = ", ".join(f"{m} ({c})" for m, c in sorted(waiting.items()))
        out.append((f"  workers wait in: {modes}", None))
    workers = doc.get("workers") or []
    busy = [w for w in workers if inflight_flagged(w.get("inflight") or {})]
    if busy:
        top = max(busy, key=lambda w: w["inflight"].get("max") or 0)
        out.append((f"  in-flight: {len(busy)} worker(s) accepted while holding open connections "
                    f"(pid {top.get('pid')} held up to {top['inflight'].get('max')})", "yellow"))
    errors = doc.get("export_errors") or {}
    if isinstance(errors, dict) and (errors.get("count") or 0) > 0:
        # The stderr warning is wiped by the next redraw of the live view: keep the failure on screen.
        out.append((f"  ! export: {errors['count']} write(s) failed, retried every 5 s; last: "
                    f"{errors.get('last_error')}", "red"))
    for flag in analysis.get("flags") or []:
        out.append((f"  ! {flag.get('message', flag)}", "yellow"))
    out += [(f"  ! {line}", "yellow") for line in degraded_lines(doc.get("diagnostics"))]
    return out


def summary_line(doc: dict[str, Any]) -> str:
    """One plain line for logs and pipes (no table)."""
    doc = _safe(doc)
    workers = doc.get("workers") or []
    total = int(doc.get("total_accepts") or 0)
    n = len(competitors(doc)["pids"])
    parts = [f"accept-watch: {total:,} accepts by {n} worker{'s' if n != 1 else ''} "
             f"in {fmt_duration(doc.get('duration_s'))}"]
    if total and workers:
        top = max(workers, key=lambda w: (int(w.get("accepts") or 0), -int(w.get("pid") or 0)))
        parts.append(f"busiest pid {top.get('pid')} {float(top.get('share') or 0) * 100:.1f}%"
                     + (f" (fair {100 / n:.1f}%)" if n else ""))
    lost = int(doc.get("lost_events") or 0)
    unattributed = int(doc.get("unattributed") or 0)
    parts.append(_loud("lost", lost)[0])
    parts.append(_loud("unattributed", unattributed)[0])
    return "; ".join(parts)
