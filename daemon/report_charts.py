"""The HTML report's plots, as inline SVG: the share per worker, accepts over time, queue waits
(all workers and per worker), connections in flight. Drawn with daemon/report_svg.py's kit; laid out
into the page by daemon/report_html.py."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from accept_watch.probes.histogram import nearest_rank, span_mid

from .analysis import MATERIAL_SHARE, inflight_flagged
from .fmt import fmt_fig, fmt_ns, fmt_pct
from .report_svg import (
    BINS_PER_DECADE,
    BLUE,
    GREY,
    GRID,
    INK,
    MUTED,
    ORANGE,
    OTHERS,
    PAD_T,
    PALE,
    PALETTE,
    RED,
    ROWS_MAX,
    TOP_N,
    _Area,
    _e,
    _empty_svg,
    _hline,
    _label_every,
    _rect,
    _svg,
    _text,
    _tick_label,
    _vline,
    log_ticks,
    nice_ticks,
)

# ---------------------------------------------------------------------------------------------------
# Share of accepts per worker
# ---------------------------------------------------------------------------------------------------


def _share_color(w: Mapping[str, Any], fair: float | None) -> str:
    if not w.get("alive", True):
        return GREY
    share = float(w.get("share") or 0)
    if fair:
        if share >= fair * (1 + MATERIAL_SHARE):
            return ORANGE
        if share <= fair * (1 - MATERIAL_SHARE):
            return PALE
    return BLUE


def _worker_title(w: Mapping[str, Any]) -> str:
    role = " (master)" if w.get("role") == "master" else ""
    state = "" if w.get("alive", True) else ", exited"
    share = fmt_pct(float(w.get("share") or 0))
    return f"pid {w['pid']}{role}: {int(w.get('accepts') or 0):,} accepts, {share}{state}"


def share_plot(workers: Sequence[Mapping[str, Any]], fair: float | None) -> str:
    label = "share of accepts per worker, with the fair share"
    if not workers:
        return _empty_svg("share", label, "No workers in this export.")
    ws = sorted(workers, key=lambda w: int(w["pid"]))
    top = max([float(w.get("share") or 0) for w in ws] + [fair or 0, 1e-9])
    ticks = nice_ticks(min(top * 1.02, 1.0))  # a share never exceeds 100 %
    if len(ws) <= ROWS_MAX:
        return _share_rows(ws, fair, ticks, label)
    return _share_columns(ws, fair, ticks, label)


def _share_rows(ws: Sequence[Mapping[str, Any]], fair: float | None, ticks: list[float],
                label: str) -> str:
    n = len(ws)
    row = max(10, min(26, int(560 / n)))
    font = 12 if row >= 16 else 10 if row >= 12 else 9
    area = _Area(PAD_T + 12 + row * n + 34, left=110, right=150, top=PAD_T + 12, bottom=34)
    scale = area.w / ticks[-1]
    body: list[str] = []
    for v in ticks:
        x = area.x0 + v * scale
        body.append(_vline(x, area.y0 - 4, area.y1, GRID if v else "#9aa3ad"))
        body.append(_text(x, area.y0 - 10, f"{_tick_label(v * 100)} %", "middle", fill=MUTED))
    for i, w in enumerate(ws):
        y = area.y0 + i * row
        share = float(w.get("share") or 0)
        mid = y + row / 2 + font * 0.35
        name = f"{'master ' if w.get('role') == 'master' else ''}{w['pid']}"
        body.append(_text(area.x0 - 8, mid, name, "end", font_size=font))
        body.append(_rect(area.x0, y + row * 0.15, max(share * scale, 0.8), row * 0.7, _share_color(w, fair),
                          _worker_title(w)))
        body.append(_text(area.x0 + share * scale + 6, mid,
                          f"{int(w.get('accepts') or 0):,} · {fmt_pct(share)}", font_size=font, fill=MUTED))
    if fair:
        x = area.x0 + fair * scale
        body.append(_vline(x, area.y0 - 4, area.y1 + 6, RED, "5 3", 1.5))
        body.append(_text(x, area.y1 + 22, f"fair share {fmt_pct(fair)}", "middle", fill=RED))
    return _svg("share", area.height, body, label)


def _share_columns(ws: Sequence[Mapping[str, Any]], fair: float | None, ticks: list[float],
                   label: str) -> str:
    n = len(ws)
    area = _Area(320, top=PAD_T + 14)
    body: list[str] = []
    area.y_grid(body, ticks, lambda v: f"{_tick_label(v * 100)} %", "share of accepts")
    cw = area.w / n
    gap = 1 if cw >= 3 else 0
    for i, w in enumerate(ws):
        share = float(w.get("share") or 0)
        y = area.y_lin(share, ticks[-1])
        body.append(_rect(area.x0 + i * cw, y, cw - gap, area.y1 - y, _share_color(w, fair),
                          _worker_title(w)))
    # Name the busiest few, where the eye goes first.
    busiest = sorted(range(n), key=lambda i: -float(ws[i].get("share") or 0))[:3]
    for rank, i in enumerate(busiest):
        share = float(ws[i].get("share") or 0)
        if share <= 0:
            continue
        y = area.y_lin(share, ticks[-1]) - 4 - 12 * (rank % 2)
        body.append(_text(area.x0 + (i + 0.5) * cw, y, str(ws[i]["pid"]), "middle", font_size=10))
    k = _label_every(n, 10)
    for i in range(0, n, k):
        x = area.x0 + (i + 0.5) * cw
        body.append(_vline(x, area.y1, area.y1 + 4, "#9aa3ad"))
        body.append(_text(x, area.y1 + 16, str(ws[i]["pid"]), "middle", fill=MUTED, font_size=10))
    body.append(_text(area.x1, area.y1 + 36, _in_pid_order(ws), "end", fill=MUTED))
    if fair:
        y = area.y_lin(fair, ticks[-1])
        body.append(_hline(area.x0, area.x1, y, RED, "5 3", 1.5))
        # Above the plot: over 256 columns, a label on the line would sit on the bars.
        body.append(_text(area.x1, area.y0 - 10, f"- - - fair share {fmt_pct(fair)}", "end", fill=RED))
    return _svg("share", area.height, body, label)


def share_legend(fair: float | None) -> str:
    items = [(BLUE, f"within ±{MATERIAL_SHARE:.0%} of the fair share")] if fair else [(BLUE, "share")]
    if fair:
        items += [(ORANGE, f"≥ {MATERIAL_SHARE:.0%} above it"), (PALE, f"≥ {MATERIAL_SHARE:.0%} below it")]
    items.append((GREY, "exited"))
    return _legend(items)


def _legend(items: Iterable[tuple[str, str]]) -> str:
    spans = "".join(f'<span><i class="sw" style="background:{c}"></i>{_e(t)}</span>' for c, t in items)
    return f'<div class="legend">{spans}</div>'


# ---------------------------------------------------------------------------------------------------
# Accepts per second over time
# ---------------------------------------------------------------------------------------------------


def _bins(history: Sequence[Sequence[Any]]) -> list[tuple[float, float, dict[str, int]]]:
    """(start, end, counts) per rate_history entry. Entries are stamped at the end of a bin of about a
    second (the daemon closes a bin at its first map read after 0.9 s), so rates divide by each bin's
    own length; the first bin starts at 0 unless the history was trimmed (then it gets a typical length)."""
    entries = sorted(history, key=lambda e: e[0])
    ends = [float(e[0]) for e in entries]
    gaps = sorted(b - a for a, b in itertools.pairwise(ends) if b > a)
    typical = gaps[len(gaps) // 2] if gaps else 1.0
    out: list[tuple[float, float, dict[str, int]]] = []
    prev: float | None = None
    for t, (_, counts) in zip(ends, entries, strict=True):
        start = (0.0 if 0 < t <= 3 * typical else t - typical) if prev is None else prev
        if t > start:
            out.append((start, t, {str(k): int(v) for k, v in counts.items()}))
        prev = t
    return out


def rate_plot(history: Sequence[Sequence[Any]]) -> tuple[str, str]:
    """Stacked accepts/s per worker (the TOP_N busiest in the history, the rest as 'others'); the
    svg and its legend."""
    label = "accepts per second, stacked by worker"
    bins = _bins(history)
    totals: dict[str, int] = {}
    for _, _, counts in bins:
        for pid, c in counts.items():
            totals[pid] = totals.get(pid, 0) + c
    grand = sum(totals.values())
    if not bins or grand == 0:
        return _empty_svg("rate", label, "No accepts in the rate history of this export."), ""
    top = sorted(totals, key=lambda p: (-totals[p], int(p)))[:TOP_N]
    rest = [p for p in totals if p not in top]
    series: list[tuple[str, str, list[float]]] = []
    for i, pid in enumerate(top):
        series.append((pid, PALETTE[i], [c.get(pid, 0) / (b - a) for a, b, c in bins]))
    if rest:
        series.append((f"{len(rest)} others", OTHERS,
                       [sum(c.get(p, 0) for p in rest) / (b - a) for a, b, c in bins]))
    stacked_max = max(sum(s[2][i] for s in series) for i in range(len(bins)))
    yt = nice_ticks(stacked_max)
    t0, t1 = bins[0][0], bins[-1][1]
    xt = [v for v in nice_ticks(t1, 8) if v >= t0 - 1e-9]
    area = _Area(300)
    body: list[str] = []
    area.y_grid(body, yt, _tick_label, "accepts/s")

    def x(t: float) -> float:
        return area.x0 + area.w * (t - t0) / (t1 - t0)

    for v in xt:
        if v <= t1 + 1e-9:
            body.append(_vline(x(v), area.y1, area.y1 + 4, "#9aa3ad"))
            body.append(_text(x(v), area.y1 + 17, f"{_tick_label(v)}", "middle", fill=MUTED))
    body.append(_text(area.x1, area.y1 + 36, "seconds since start", "end", fill=MUTED))
    base = [0.0] * len(bins)
    for _name, color, rates in series:
        upper = [b + r for b, r in zip(base, rates, strict=True)]
        pts = []
        for (a, b, _), u in zip(bins, upper, strict=True):
            pts += [f"{x(a):.1f},{area.y_lin(u, yt[-1]):.1f}", f"{x(b):.1f},{area.y_lin(u, yt[-1]):.1f}"]
        for (a, b, _), lo in zip(reversed(bins), reversed(base), strict=True):
            pts += [f"{x(b):.1f},{area.y_lin(lo, yt[-1]):.1f}", f"{x(a):.1f},{area.y_lin(lo, yt[-1]):.1f}"]
        body.append(f'<polygon points="{" ".join(pts)}" fill="{color}" stroke="{color}" stroke-width="0.5"/>')
        base = upper
    # Legend: each series' share of the accepts plotted (not of the whole run: history is bounded).
    widths = [b - a for a, b, _ in bins]
    legend = _legend(
        (color, f"{name} · {fmt_pct(sum(r * w for r, w in zip(rates, widths, strict=True)) / grand)}")
        for name, color, rates in series
    )
    return _svg("rate", area.height, body, label), legend


# ---------------------------------------------------------------------------------------------------
# Queue wait
# ---------------------------------------------------------------------------------------------------


def merged_wait_buckets(workers: Iterable[Mapping[str, Any]]) -> dict[tuple[int, int], int]:
    merged: dict[tuple[int, int], int] = {}
    for w in workers:
        for low, high, count in w.get("queue_wait_hist") or []:
            merged[(int(low), int(high))] = merged.get((int(low), int(high)), 0) + int(count)
    return {k: c for k, c in merged.items() if c > 0}


def bucket_percentile(buckets: Mapping[tuple[int, int], int], q: float) -> float | None:
    """Nearest-rank percentile at the bucket midpoint (probes.histogram's rule), in ns."""
    key = nearest_rank(buckets, q)
    return None if key is None else span_mid(*key)


def log_bins(buckets: Mapping[tuple[int, int], int]) -> dict[int, float]:
    """Re-bin [low, high) ns buckets into fixed 1/BINS_PER_DECADE-decade bins (k -> count).

    The log-linear buckets get narrower in log space within each power of two; drawn as they are,
    their heights would not be comparable. Each bucket's count is spread over the fixed bins in
    proportion to the log-width they share (values below 1 ns are put at 1 ns)."""
    out: dict[int, float] = {}
    for (low, high), count in buckets.items():
        a = math.log10(max(low, 1)) * BINS_PER_DECADE
        b = math.log10(max(high, max(low, 1) * 1.0001)) * BINS_PER_DECADE
        k = math.floor(a)
        while k < b:
            part = (min(b, k + 1) - max(a, k)) / (b - a)
            out[k] = out.get(k, 0.0) + count * part
            k += 1
    return out


def wait_histogram(workers: Sequence[Mapping[str, Any]]) -> str:
    label = "time in the accept queue, all workers (log time axis)"
    buckets = merged_wait_buckets(workers)
    if not buckets:
        return _empty_svg("wait-hist", label, "No queue-wait samples in this export.")
    bins = log_bins(buckets)
    k0, k1 = min(bins), max(bins) + 1
    lo, hi = 10 ** (k0 / BINS_PER_DECADE), 10 ** (k1 / BINS_PER_DECADE)
    # Whole decades at both ends when that does not more than double the axis: ticks land on 1, 10, 100.
    dlo, dhi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi) - 1e-9)
    if math.log10(dhi / dlo) <= 2 * math.log10(hi / lo) + 0.5:
        lo, hi = dlo, dhi
    # A band above the plot for the percentile labels, so that they never sit on a bar.
    area = _Area(330, top=58)
    yt = nice_ticks(max(bins.values()))
    body: list[str] = []
    area.y_grid(body, yt, _tick_label, f"connections per 1/{BINS_PER_DECADE} decade", label_y=14)
    span = math.log10(hi) - math.log10(lo)

    def x(ns: float) -> float:
        return area.x0 + area.w * (math.log10(ns) - math.log10(lo)) / span

    for v, labelled in log_ticks(lo, hi):
        body.append(_vline(x(v), area.y1, area.y1 + (5 if labelled else 3), "#9aa3ad"))
        if labelled:
            body.append(_text(x(v), area.y1 + 18, fmt_ns(v), "middle", fill=MUTED))
    for k, c in sorted(bins.items()):
        a, b = 10 ** (k / BINS_PER_DECADE), 10 ** ((k + 1) / BINS_PER_DECADE)
        y = area.y_lin(c, yt[-1])
        body.append(_rect(x(a) + 0.5, y, x(b) - x(a) - 1, area.y1 - y, BLUE,
                          f"{fmt_ns(a)} – {fmt_ns(b)}: {c:,.0f} connection(s)"))
    for q, color, label_y in ((50, INK, area.y0 - 24), (99, RED, area.y0 - 6)):
        v = bucket_percentile(buckets, q)
        if v is not None and v > 0:
            xv = min(max(x(max(v, lo)), area.x0), area.x1)
            body.append(_vline(xv, label_y - 10, area.y1, color, "4 3", 1.5))
            anchor = "end" if xv > area.x1 - 120 else "start"
            body.append(_text(xv + (-5 if anchor == "end" else 5), label_y, f"p{q} {fmt_ns(v)}",
                              anchor, fill=color, font_weight="600"))
    body.append(_text(area.x1, area.y1 + 38, "handshake done → accept() returned", "end", fill=MUTED))
    return _svg("wait-hist", area.height, body, label)


def _in_pid_order(ws: Sequence[Mapping[str, Any]]) -> str:
    masters = sum(1 for w in ws if w.get("role") == "master")
    n = len(ws) - masters
    return f"{n} worker{'s' if n != 1 else ''}{' and the master' if masters else ''}, in pid order"


def _pid_axis(body: list[str], area: _Area, ws: Sequence[Mapping[str, Any]], room: int = 20) -> None:
    n = len(ws)
    cw = area.w / n
    k = _label_every(n, room)
    for i in range(0, n, k):
        x = area.x0 + (i + 0.5) * cw
        body.append(_vline(x, area.y1, area.y1 + 4, "#9aa3ad"))
        body.append(_text(x, area.y1 + 16, str(ws[i]["pid"]), "middle", fill=MUTED,
                          font_size=10 if n > 12 else 12))
    body.append(_text(area.x1, area.y1 + 36, _in_pid_order(ws), "end", fill=MUTED))


def wait_per_worker(workers: Sequence[Mapping[str, Any]]) -> str:
    """p50-p99 range per worker on a log axis, with p50 (dot), p99 (bar) and max (small ring)."""
    label = "queue wait per worker: p50, p99 and max (log axis)"
    rows = []
    for w in sorted(workers, key=lambda w: int(w["pid"])):
        q = w.get("queue_wait_us") or {}
        if q.get("p50") is not None and q.get("p99") is not None:
            rows.append((w, float(q["p50"]) * 1000, float(q["p99"]) * 1000,
                         float(q["max"]) * 1000 if q.get("max") is not None else None, q.get("count")))
    if not rows:
        return _empty_svg("wait-workers", label, "No per-worker queue-wait percentiles in this export.")
    values = [v for _, p50, p99, mx, _ in rows for v in (p50, p99, mx) if v is not None and v > 0] or [1.0]
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)) + 1e-9)
    area = _Area(280)
    span = math.log10(hi / lo)

    def y(ns: float) -> float:
        return area.y1 - area.h * (math.log10(max(ns, lo)) - math.log10(lo)) / span

    body: list[str] = []
    for v, labelled in log_ticks(lo, hi):
        body.append(_hline(area.x0, area.x1, y(v), GRID if labelled else "#f1f3f6"))
        if labelled:
            body.append(_text(area.x0 - 6, y(v) + 4, fmt_ns(v), "end", fill=MUTED))
    body.append(_text(area.x0, area.y0 - 10, "time in the accept queue", fill=MUTED))
    n = len(rows)
    cw = area.w / n
    r = max(1.6, min(4.5, cw * 0.28))
    for i, (w, p50, p99, mx, count) in enumerate(rows):
        cx = area.x0 + (i + 0.5) * cw
        tip = (f"pid {w['pid']}: p50 {fmt_ns(p50)}, p99 {fmt_ns(p99)}, max {fmt_ns(mx)}"
               f"{f', {int(count):,} samples' if count is not None else ''}")
        parts = [_vline(cx, y(p99), y(p50), PALE, width=max(1.0, min(6.0, cw * 0.35)))]
        if mx is not None:
            parts.append(f'<circle cx="{cx:.1f}" cy="{y(mx):.1f}" r="{r * 0.8:.1f}" fill="none" '
                         f'stroke="{MUTED}" stroke-width="1"/>')
        half = max(1.0, min(7.0, cw * 0.35))
        parts.append(f'<line x1="{cx - half:.1f}" x2="{cx + half:.1f}" y1="{y(p99):.1f}" y2="{y(p99):.1f}" '
                     f'stroke="{RED}" stroke-width="2"/>')
        parts.append(f'<circle cx="{cx:.1f}" cy="{y(p50):.1f}" r="{r:.1f}" fill="{BLUE}"/>')
        body.append(f"<g><title>{_e(tip)}</title>{''.join(parts)}</g>")
    _pid_axis(body, area, [w for w, *_ in rows])
    return _svg("wait-workers", area.height, body, label)


def wait_legend() -> str:
    return _legend([(BLUE, "p50 (dot)"), (RED, "p99 (bar)"), (MUTED, "max (ring)")])


# ---------------------------------------------------------------------------------------------------
# In-flight connections
# ---------------------------------------------------------------------------------------------------


def inflight_plot(workers: Sequence[Mapping[str, Any]]) -> str | None:
    """Most connections each worker held at once (None when the export has no in-flight data)."""
    rows = sorted((w for w in workers if isinstance(w.get("inflight"), dict)), key=lambda w: int(w["pid"]))
    if not rows:
        return None
    label = "most connections held at once per worker (accepted, not yet closed)"
    maxes = [int(w["inflight"].get("max") or 0) for w in rows]
    yt = nice_ticks(max([*maxes, 2]), integer=True)
    area = _Area(260)
    body: list[str] = []
    area.y_grid(body, yt, _tick_label, "max in-flight connections")
    n = len(rows)
    cw = area.w / n
    gap = min(8.0, cw * 0.2) if cw >= 3 else 0
    for i, (w, m) in enumerate(zip(rows, maxes, strict=True)):
        inf = w["inflight"]
        y = area.y_lin(m, yt[-1])
        life = inf.get("life_ms") or {}
        tip = (f"pid {w['pid']}: up to {m} at once, {int(inf.get('busy_accepts') or 0):,} accepted while "
               f"busy, {int(inf.get('now') or 0)} open at the end, {int(inf.get('closed') or 0):,} closed, "
               f"mean life {fmt_fig(life.get('mean'))} ms")
        bw = min(cw - gap, 56.0)  # one or two workers: a bar, not a wall
        body.append(_rect(area.x0 + (i + 0.5) * cw - bw / 2, y, bw, area.y1 - y,
                          RED if inflight_flagged(inf) else BLUE, tip))
        if n <= 32 and m > 0:
            body.append(_text(area.x0 + (i + 0.5) * cw, y - 4, str(m), "middle", font_size=11, fill=MUTED))
    body.append(_hline(area.x0, area.x1, area.y_lin(1, yt[-1]), INK, "5 3", 1.2))
    _pid_axis(body, area, rows)
    return _svg("inflight", area.height, body, label)
