"""The HTML report: one self-contained page (inline CSS, SVG drawn here; no script, no URL of any kind).

Every plot is an inline <svg class="plot" data-plot="..."> sized by a viewBox, so it scales with the
page. Plots must stay readable from 1 to 256 workers: per-worker plots switch from labelled rows to
columns in pid order (pid order matters: fork order is the order EPOLLEXCLUSIVE waiters register in),
and the rate plot stacks the 8 busiest workers plus "others".

Input is a document already checked by report.validate_export, plus the recomputed analysis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .analysis import MATERIAL_SHARE, competitors, inflight_flagged
from .fmt import fmt_duration, fmt_fig, fmt_int, fmt_p, fmt_pct, fmt_span
from .report_charts import (  # noqa: F401 - also read through this module: the report's parts
    _bins,
    _legend,
    bucket_percentile,
    inflight_plot,
    log_bins,
    merged_wait_buckets,
    rate_plot,
    share_legend,
    share_plot,
    wait_histogram,
    wait_legend,
    wait_per_worker,
)
from .report_svg import (  # noqa: F401 - also read through this module: the report's parts
    BLUE,
    GREY,
    INK,
    RED,
    TOP_N,
    _e,
    _us,
    log_ticks,
    nice_ticks,
)

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
            f"<td>{fmt_int(lst.get('accepts'))}</td>"
            f"<td>{fmt_int(q.get('current'))}</td><td{' class=hot' if near else ''}>{fmt_int(mx)}</td>"
            f"<td>{fmt_int(limit)}</td><td>{_spark(lst.get('depth_history') or [], limit)}</td></tr>"
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
            f"<td>{fmt_int(w.get('accepts'))}</td>"
            f"<td style='{bar}'{' class=hot' if hot else ''}>{fmt_pct(share)}</td>",
            f"<td>{_us(q.get('p50'))}</td><td>{_us(q.get('p99'))}</td><td>{_us(q.get('max'))}</td>",
        ]
        if with_inflight:
            inf = w.get("inflight") if isinstance(w.get("inflight"), dict) else {}
            mean_life = (inf.get("life_ms") or {}).get("mean")
            flagged = bool(inf) and inflight_flagged(inf)
            cells.append(
                f"<td{' class=hot' if flagged else ''}>{fmt_int(inf.get('max'))}</td>"
                f"<td>{fmt_int(inf.get('busy_accepts'))}</td>"
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
        (fmt_fig(fair.get("jain")), "Jain's index (1 = even)"),
        (fmt_fig(fair.get("max_mean_ratio")), "max / mean (1 = even)"),
        (fmt_fig(fair.get("cv")), "coeff. of variation (0 = even)"),
        (fmt_p(fair.get("chi2_p")), f"chi-square p vs even split{f' (df {df})' if df else ''}"),
        (fmt_fig(fair.get("gini")), "Gini (0 = even)"),
    ]
    out = "".join(f"<div><b>{_e(v)}</b><span>{_e(c)}</span></div>" for v, c in figs)
    windows = []
    for name, win in sorted((fair.get("windows") or {}).items()):
        if isinstance(win, dict) and win.get("jain") is not None:
            windows.append(f"last {name[:-1]} s: Jain {fmt_fig(win['jain'])}, "
                           f"max/mean {fmt_fig(win.get('max_mean_ratio'))}, p {fmt_p(win.get('chi2_p'))} "
                           f"({fmt_int(win.get('accepts'))} accepts)")
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
        _tile(f"{fmt_int(q_max)} / {fmt_int(q_limit)}", "accept queue max / limit",
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
