"""The HTML report: one self-contained page (inline CSS, SVG drawn here; no script, no URL of any kind).

Every plot is an inline <svg class="plot" data-plot="..."> sized by a viewBox, so it scales with the
page. Plots must stay readable from 1 to 256 workers: per-worker plots switch from labelled rows to
columns in pid order (pid order matters: fork order is the order EPOLLEXCLUSIVE waiters register in),
and the rate plot stacks the 8 busiest workers plus "others".

Input is a document already checked by report.validate_export, plus the recomputed analysis.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from accept_watch.probes.histogram import nearest_rank, span_mid

from .analysis import MATERIAL_SHARE, competitors, inflight_flagged
from .report_svg import (  # noqa: F401 - fmt_*, nice_ticks, log_ticks: the report API
    BINS_PER_DECADE,
    BLUE,
    GREY,
    GRID,
    INK,
    MUTED,
    ORANGE,
    OTHERS,
    PAD_B,
    PAD_L,
    PAD_R,
    PAD_T,
    PALE,
    PALETTE,
    PLOT_W,
    RED,
    ROWS_MAX,
    TOP_N,
    _Area,
    _e,
    _empty_svg,
    _fig,
    _hline,
    _int,
    _label_every,
    _line,
    _pct,
    _rect,
    _svg,
    _text,
    _tick_label,
    _us,
    _vline,
    fmt_ns,
    fmt_p,
    fmt_span,
    log_ticks,
    nice_ticks,
)
from .terminal import fmt_duration

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#f4f6f9}
main{max-width:1080px;margin:0 auto;padding:24px 28px 40px;background:#fff;min-height:100vh}
h1{font-size:22px;margin:0 0 2px}
h2{font-size:17px;margin:30px 0 6px;padding-top:6px;border-top:1px solid #e6e9ee}
code{font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;word-break:break-all}
.muted{color:#5f6b7a} .small{font-size:12.5px}
.cmd{margin:2px 0 10px;color:#5f6b7a}
.tiles{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0}
.tile{border:1px solid #e1e5eb;border-radius:6px;padding:6px 12px;min-width:112px;background:#fafbfc}
.tile b{display:block;font-size:19px;font-variant-numeric:tabular-nums}
.tile span{font-size:12px;color:#5f6b7a}
.tile.loud{background:#c62828;border-color:#c62828;color:#fff} .tile.loud span{color:#fde}
.verdict{border-left:6px solid #4e79a7;background:#f2f6fb;padding:12px 16px;border-radius:4px;margin:16px 0}
.verdict.concentrated,.verdict.single-acceptor{border-color:#e8772e;background:#fdf5ee}
.verdict.not-enough-data{border-color:#9aa3ad;background:#f4f5f7}
.verdict .sentence{font-size:16px;font-weight:600;margin:4px 0 0}
.badge{display:inline-block;font-size:12px;font-weight:600;text-transform:uppercase;letter-spacing:.04em;
 color:#5f6b7a}
.figs{display:flex;flex-wrap:wrap;gap:6px 22px;margin:12px 0 4px}
.figs div b{font-size:17px;font-variant-numeric:tabular-nums}
.figs div span{display:block;font-size:11.5px;color:#5f6b7a}
ul.flags{margin:10px 0 0;padding-left:20px} ul.flags li{color:#8a4b00;margin:3px 0}
.warn{color:#8a4b00;font-weight:600}
.loudline{background:#c62828;color:#fff;padding:8px 12px;border-radius:4px;font-weight:600}
svg.plot{display:block;max-width:100%;height:auto;margin:6px 0 2px}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:12.5px;margin:2px 0 6px}
.sw{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
table{border-collapse:collapse;width:100%;font-size:13px;font-variant-numeric:tabular-nums}
th,td{padding:3px 8px;text-align:right;white-space:nowrap} th{border-bottom:1px solid #cfd5dd;font-weight:600}
th:first-child,td:first-child{text-align:left} tbody tr:nth-child(even){background:#f6f7f9}
td.hot{color:#c62828;font-weight:600} tr.gone td{color:#8a93a0}
.tablewrap{overflow-x:auto}
footer{margin-top:28px;font-size:12px;color:#5f6b7a}
"""


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
    share = _pct(float(w.get("share") or 0))
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
        body.append(_text(area.x0 + share * scale + 6, mid, f"{int(w.get('accepts') or 0):,} · {_pct(share)}",
                          font_size=font, fill=MUTED))
    if fair:
        x = area.x0 + fair * scale
        body.append(_vline(x, area.y0 - 4, area.y1 + 6, RED, "5 3", 1.5))
        body.append(_text(x, area.y1 + 22, f"fair share {_pct(fair)}", "middle", fill=RED))
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
        body.append(_text(area.x1, area.y0 - 10, f"- - - fair share {_pct(fair)}", "end", fill=RED))
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
        (color, f"{name} · {_pct(sum(r * w for r, w in zip(rates, widths, strict=True)) / grand)}")
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
               f"mean life {_fig(life.get('mean'))} ms")
        bw = min(cw - gap, 56.0)  # one or two workers: a bar, not a wall
        body.append(_rect(area.x0 + (i + 0.5) * cw - bw / 2, y, bw, area.y1 - y,
                          RED if inflight_flagged(inf) else BLUE, tip))
        if n <= 32 and m > 0:
            body.append(_text(area.x0 + (i + 0.5) * cw, y - 4, str(m), "middle", font_size=11, fill=MUTED))
    body.append(_hline(area.x0, area.x1, area.y_lin(1, yt[-1]), INK, "5 3", 1.2))
    _pid_axis(body, area, rows)
    return _svg("inflight", area.height, body, label)


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


def _spark(points: Sequence[Sequence[float]], limit: int | None) -> str:
    """Accept-queue depth over time, 160x28, scaled to its own maximum."""
    if len(points) < 2:
        return "<span class='muted'>–</span>"
    w, h = 160, 28
    t0, t1 = float(points[0][0]), float(points[-1][0])
    top = max(max(float(p[1]) for p in points), 1.0)
    pts = " ".join(
        f"{(float(t) - t0) / (t1 - t0 or 1) * (w - 2) + 1:.1f},{h - 2 - float(d) / top * (h - 4):.1f}"
        for t, d in points
    )
    of = f" of a {limit:,} limit" if limit else ""
    return (f'<svg class="spark" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
            f'aria-label="queue depth over time"><title>queue depth over time, peak {top:g}{of}</title>'
            f'<polyline points="{pts}" fill="none" stroke="{BLUE}" stroke-width="1.3"/></svg>')


def listener_table(listeners: Sequence[Mapping[str, Any]]) -> str:
    if not listeners:
        return "<p class='muted'>No listening sockets in this export.</p>"
    rows = []
    for lst in listeners:
        q = lst.get("queue_depth") or {}
        mx, limit = q.get("max"), q.get("limit")
        near = mx is not None and bool(limit) and mx >= 0.9 * limit
        addr = str(lst.get("address") or "?")
        endpoint = f"[{addr}]:{lst.get('port')}" if ":" in addr else f"{addr}:{lst.get('port')}"
        closed = "" if lst.get("open", True) else " (closed)"
        rows.append(
            f"<tr><td>{_e(endpoint)}{closed}</td><td>{_e(lst.get('family', ''))}</td>"
            f"<td>{_e(lst.get('mode'))}</td><td>{len(lst.get('pids') or [])}</td>"
            f"<td>{_int(lst.get('accepts'))}</td>"
            f"<td>{_int(q.get('current'))}</td><td{' class=hot' if near else ''}>{_int(mx)}</td>"
            f"<td>{_int(limit)}</td><td>{_spark(lst.get('depth_history') or [], limit)}</td></tr>"
        )
    head = ("<tr><th>listener</th><th>family</th><th>mode</th><th>processes</th><th>accepts</th>"
            "<th>queue now</th><th>queue max</th><th>limit</th><th>queue depth over time</th></tr>")
    return f"<div class='tablewrap'><table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></div>"


def worker_table(workers: Sequence[Mapping[str, Any]], fair: float | None) -> str:
    if not workers:
        return "<p class='muted'>No workers in this export.</p>"
    with_inflight = any(isinstance(w.get("inflight"), dict) for w in workers)
    top = max(float(w.get("share") or 0) for w in workers) or 1.0
    rows = []
    for w in sorted(workers, key=lambda w: int(w["pid"])):
        q = w.get("queue_wait_us") or {}
        share = float(w.get("share") or 0)
        # The share cell carries its own bar (a CSS gradient: no image, no script).
        pct = share / top * 100
        bar = f"background:linear-gradient(90deg,#dbe6f3 {pct:.1f}%,transparent {pct:.1f}%)"
        hot = fair is not None and share >= fair * (1 + MATERIAL_SHARE)
        cells = [
            f"<td>{_e(w['pid'])}</td><td>{_e(w.get('role', 'worker'))}</td>"
            f"<td>{_int(w.get('accepts'))}</td>"
            f"<td style='{bar}'{' class=hot' if hot else ''}>{_pct(share)}</td>",
            f"<td>{_us(q.get('p50'))}</td><td>{_us(q.get('p99'))}</td><td>{_us(q.get('max'))}</td>",
        ]
        if with_inflight:
            inf = w.get("inflight") if isinstance(w.get("inflight"), dict) else {}
            mean_life = (inf.get("life_ms") or {}).get("mean")
            flagged = bool(inf) and inflight_flagged(inf)
            cells.append(
                f"<td{' class=hot' if flagged else ''}>{_int(inf.get('max'))}</td>"
                f"<td>{_int(inf.get('busy_accepts'))}</td>"
                f"<td>{'–' if mean_life is None else f'{mean_life:.3g} ms'}</td>"
            )
        cells.append(f"<td>{'alive' if w.get('alive', True) else 'exited'}</td>")
        rows.append(f"<tr{'' if w.get('alive', True) else ' class=gone'}>{''.join(cells)}</tr>")
    head = ("<tr><th>pid</th><th>role</th><th>accepts</th><th>share</th><th>wait p50</th><th>p99</th>"
            "<th>max</th>")
    if with_inflight:
        head += "<th>in-flight max</th><th>busy accepts</th><th>conn. life</th>"
    head += "<th>state</th></tr>"
    return f"<div class='tablewrap'><table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></div>"


# ---------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------


def _tile(value: str, caption: str, loud: bool = False) -> str:
    return f"<div class='tile{' loud' if loud else ''}'><b>{_e(value)}</b><span>{_e(caption)}</span></div>"


def _figures(fair: Mapping[str, Any]) -> str:
    df = fair.get("chi2_df")
    figs = [
        (_fig(fair.get("jain")), "Jain's index (1 = even)"),
        (_fig(fair.get("max_mean_ratio")), "max / mean (1 = even)"),
        (_fig(fair.get("cv")), "coeff. of variation (0 = even)"),
        (fmt_p(fair.get("chi2_p")), f"chi-square p vs even split{f' (df {df})' if df else ''}"),
        (_fig(fair.get("gini")), "Gini (0 = even)"),
    ]
    out = "".join(f"<div><b>{_e(v)}</b><span>{_e(c)}</span></div>" for v, c in figs)
    windows = []
    for name, win in sorted((fair.get("windows") or {}).items()):
        if isinstance(win, dict) and win.get("jain") is not None:
            windows.append(f"last {name[:-1]} s: Jain {_fig(win['jain'])}, "
                           f"max/mean {_fig(win.get('max_mean_ratio'))}, p {fmt_p(win.get('chi2_p'))} "
                           f"({_int(win.get('accepts'))} accepts)")
    extra = f"<p class='small muted'>{_e(' · '.join(windows))}</p>" if windows else ""
    return f"<div class='figs'>{out}</div>{extra}"


def render_html(doc: Mapping[str, Any], result: Mapping[str, Any], warnings: Sequence[str] = ()) -> str:
    """The whole page as one string."""
    workers = list(doc.get("workers") or [])
    listeners = list(doc.get("listeners") or [])
    verdict = result.get("verdict") or {}
    fair_figs = result.get("fairness") or {}
    comp = competitors({"workers": workers, "analysis": result})
    n_comp, fair = len(comp["pids"]), comp["fair_share"]
    lost, unattributed = int(doc.get("lost_events") or 0), int(doc.get("unattributed") or 0)
    total = int(doc.get("total_accepts") or 0)
    by_workers = sum(int(w.get("accepts") or 0) for w in workers)
    q_max = max((lst["queue_depth"]["max"] for lst in listeners
                 if (lst.get("queue_depth") or {}).get("max") is not None), default=None)
    q_limit = max((lst["queue_depth"]["limit"] for lst in listeners
                   if (lst.get("queue_depth") or {}).get("limit") is not None), default=None)

    tiles = [
        _tile(f"{total:,}", "accepts"),
        _tile(f"{n_comp}", f"worker{'s' if n_comp != 1 else ''} competing"),
        _tile(fmt_duration(doc.get("duration_s")),
              "ran" if doc.get("ended_at") else "elapsed (still running)"),
        _tile(f"{unattributed:,}", "UNATTRIBUTED – counts not exact" if unattributed else "unattributed",
              loud=unattributed > 0),
        _tile(f"{lost:,}", "LOST EVENTS (stream only)" if lost else "lost events", loud=lost > 0),
        _tile(f"{_int(q_max)} / {_int(q_limit)}", "accept queue max / limit",
              loud=q_max is not None and bool(q_limit) and q_max >= 0.9 * q_limit),
        _tile(str(doc.get("probe")), "probe"),
    ]
    loss_line = ""
    if unattributed:
        loss_line = (f"<p class='loudline'>{unattributed:,} accept(s) could not be attributed to a worker: "
                     "the counts below are not exact.</p>")
    gap_note = ""
    if total != by_workers:
        gap_note = (f"<p class='small muted'>{total - by_workers:,} of the {total:,} accepts belong to "
                    "workers no longer listed in the export (evicted after exiting).</p>")

    pattern = str(verdict.get("pattern", "?"))
    counts = (result.get("wait_modes") or {}).get("counts") or {}
    modes = {m: c for m, c in counts.items() if m != "unknown"}
    mode_text = (", ".join(f"{m} ({c})" for m, c in sorted(modes.items())) if modes
                 else "not recorded in this export")
    flags = "".join(f"<li>{_e(m)}</li>" for m in flag_messages(result))
    warn = "".join(f"<p class='warn'>Note: {_e(w)}</p>" for w in warnings)

    rate_svg, rate_legend = rate_plot(doc.get("rate_history") or [])
    inflight = inflight_plot(workers)
    inflight_section = (
        inflight + _legend([(BLUE, "worker"), (RED, "flagged: kept accepting while holding open connections"),
                            (INK, "dashed line: 1, one connection at a time")])
        if inflight is not None else
        "<p class='muted'>This export has no in-flight data (per-worker open connections).</p>"
    )
    detail = f" – {_e(doc['probe_detail'])}" if doc.get("probe_detail") else ""

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>accept-watch report · master {_e(doc.get('master_pid'))} · {_e(pattern)}</title>
<style>{CSS}</style></head><body><main>
<h1>accept-watch report</h1>
<p class="cmd">master pid <b>{_e(doc.get('master_pid'))}</b>
<code>{_e(doc.get('master_cmdline', ''))}</code></p>
<div class="tiles">{''.join(tiles)}</div>
<p class="small muted">probe {_e(doc.get('probe'))}{detail} · kernel {_e(doc.get('kernel', '?'))}
 · {_e(fmt_span(doc.get('started_at'), doc.get('ended_at')))}</p>
{loss_line}{gap_note}
<section class="verdict {_e(pattern.replace(' ', '-'))}">
<span class="badge">{_e(pattern)} · {_e(verdict.get('confidence', '?'))} confidence</span>
<p class="sentence">{_e(verdict.get('sentence', 'No verdict.'))}</p>
{_figures(fair_figs)}
<p class="small">Workers wait in: <b>{_e(mode_text)}</b></p>
{f'<ul class="flags">{flags}</ul>' if flags else ''}{warn}
</section>
<h2>Share of accepts per worker</h2>
{share_plot(workers, fair)}{share_legend(fair)}
<h2>Accepts per second</h2>
<p class="small muted">Stacked by worker: the {TOP_N} busiest in this window, the rest summed; bins of about a
second over the last {_e(fmt_duration(_history_span(doc.get('rate_history') or [])))} of the run.</p>
{rate_svg}{rate_legend}
<h2>Time in the accept queue</h2>
<p class="small muted">From the completed handshake to accept() returning it: all workers together, then per
worker.</p>
{wait_histogram(workers)}
{wait_per_worker(workers)}{wait_legend() if merged_wait_buckets(workers) else ''}
<h2>In-flight connections per worker</h2>
<p class="small muted">Connections a worker accepted and had not closed yet. More than one means it accepted
while busy: requests then wait inside the worker, where the accept queue does not show them.</p>
{inflight_section}
<h2>Listeners</h2>
{listener_table(listeners)}
<h2>Workers</h2>
{worker_table(workers, fair)}
<footer>accept-watch {_e(doc.get('tool_version', '?'))} · {_e(doc.get('schema'))} · analysis recomputed by
this version from the export's counts and accept sequence.</footer>
</main></body></html>
"""


def flag_messages(result: Mapping[str, Any]) -> list[str]:
    """The analysis flags, minus one that only repeats the verdict ("not enough data")."""
    sentence = (result.get("verdict") or {}).get("sentence")
    out = []
    for f in result.get("flags") or []:
        message = str(f.get("message", "")) if isinstance(f, dict) else str(f)
        if message and message != sentence:
            out.append(message)
    return out


def _history_span(history: Sequence[Sequence[Any]]) -> float | None:
    bins = _bins(history)
    return bins[-1][1] - bins[0][0] if bins else None
