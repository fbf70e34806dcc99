"""The HTML report: one self-contained file (inline CSS and SVG drawn here, no script, no URL)."""

from __future__ import annotations

import html
import math
from typing import Any

W, H = 760, 260  # plot size in px
PAD_L, PAD_R, PAD_T, PAD_B = 56, 16, 22, 34
TOP_N = 8
COLORS = ["#2f6fdb", "#e0592a", "#2e9e5b", "#9a4fc2", "#c99a14", "#1b9aaa", "#d6457a", "#6b7bcf", "#888888"]

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:820px;color:#1d2430;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
.muted{color:#667} .loud{background:#c62828;color:#fff;padding:6px 10px;border-radius:4px}
.verdict{font-size:16px;font-weight:600;background:#f3f6fb;padding:10px 12px;border-radius:6px}
table{border-collapse:collapse;width:100%;font-size:13px} th,td{padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left} tr:nth-child(even){background:#f6f7f9}
.figs span{display:inline-block;margin-right:18px} svg{display:block;margin:4px 0}
.flag{color:#8a5a00}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return f"{v:,}" if isinstance(v, int) else _e(v)


def _us(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v / 1000:.3g} ms"
    return f"{v:.3g} µs"


def _svg(body: list[str], height: int = H, label: str = "") -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
            f'viewBox="0 0 {W} {height}" role="img" aria-label="{_e(label)}" font-size="11" '
            f'font-family="system-ui,sans-serif">{"".join(body)}</svg>')


def share_bars(workers: list[dict[str, Any]]) -> str:
    """Horizontal bars, one per worker (top 64 by accepts), with the fair-share line."""
    shown = sorted(workers, key=lambda w: -int(w.get("accepts") or 0))[:64]
    shown.sort(key=lambda w: int(w["pid"]))
    competing = [w for w in workers if w.get("role") != "master" or w.get("accepts")]
    fair = 1 / len(competing) if competing else 0
    row = 16 if len(shown) <= 24 else 9
    height = PAD_T + PAD_B + row * max(1, len(shown))
    top = max([float(w.get("share") or 0) for w in shown] + [fair, 1e-9])
    scale = (W - PAD_L - 150) / top
    body: list[str] = []
    for i, w in enumerate(shown):
        y = PAD_T + i * row
        share = float(w.get("share") or 0)
        color = COLORS[0] if w.get("alive", True) else "#b8bec8"
        body.append(f'<text x="{PAD_L - 6}" y="{y + row * 0.75:.1f}" text-anchor="end">{_e(w["pid"])}</text>')
        body.append(f'<rect x="{PAD_L}" y="{y + 1}" width="{max(0.5, share * scale):.1f}" '
                    f'height="{row - 3}" fill="{color}"/>')
        if row >= 12:
            body.append(f'<text x="{PAD_L + share * scale + 6:.1f}" y="{y + row * 0.75:.1f}">'
                        f'{int(w.get("accepts") or 0):,} · {share * 100:.1f} %</text>')
    if fair:
        x = PAD_L + fair * scale
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T - 4}" y2="{height - PAD_B + 4}" '
                    f'stroke="#e0592a" stroke-dasharray="4 3"/>')
        body.append(f'<text x="{x:.1f}" y="{height - PAD_B + 18}" text-anchor="middle" fill="#e0592a">'
                    f'fair share {fair * 100:.1f} %</text>')
    return _svg(body, height, "share of accepts per worker")


def _axis(body: list[str], y_max: float, y_label: str) -> None:
    for i in range(5):
        v = y_max * i / 4
        y = H - PAD_B - (H - PAD_T - PAD_B) * i / 4
        body.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6eb"/>')
        body.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    body.append(f'<text x="{PAD_L + 4}" y="{PAD_T - 2}" fill="#667">{_e(y_label)}</text>')


def rate_lines(doc: dict[str, Any]) -> str:
    """Accepts/s per worker over time: the TOP_N busiest, the rest summed as 'others'."""
    history = doc.get("rate_history") or []
    if not history:
        return "<p class='muted'>No rate history in this export.</p>"
    totals: dict[str, int] = {}
    for _, counts in history:
        for pid, c in counts.items():
            totals[pid] = totals.get(pid, 0) + c
    top = sorted(totals, key=lambda p: -totals[p])[:TOP_N]
    series = {pid: [(t, counts.get(pid, 0)) for t, counts in history] for pid in top}
    if len(totals) > TOP_N:
        series["others"] = [(t, sum(c for p, c in counts.items() if p not in top)) for t, counts in history]
    t0, t1 = history[0][0], history[-1][0]
    y_max = max([v for pts in series.values() for _, v in pts] + [1])
    body: list[str] = []
    _axis(body, y_max, "accepts/s")

    def xy(t: float, v: float) -> str:
        x = PAD_L + (W - PAD_L - PAD_R) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.5)
        y = H - PAD_B - (H - PAD_T - PAD_B) * v / y_max
        return f"{x:.1f},{y:.1f}"

    legend = []
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[min(i, len(COLORS) - 1)] if name != "others" else COLORS[-1]
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" '
                    f'points="{" ".join(xy(t, v) for t, v in pts)}"/>')
        legend.append(f'<span style="color:{color}">■</span> {_e(name)}')
    body.append(f'<text x="{PAD_L}" y="{H - 8}">{t0:.0f} s</text>')
    body.append(f'<text x="{W - PAD_R}" y="{H - 8}" text-anchor="end">{t1:.0f} s since start</text>')
    return _svg(body, H, "accepts per second per worker") + f"<p class='figs'>{' &nbsp; '.join(legend)}</p>"


def wait_histogram(workers: list[dict[str, Any]]) -> str:
    """Queue-wait distribution of all workers, on a log-scaled time axis (one bar per power of 2)."""
    merged: dict[int, int] = {}
    for w in workers:
        for low, high, count in w.get("queue_wait_hist") or []:
            k = int(2 * math.log2(max(1, (low + high) / 2)))  # half-octave bins
            merged[k] = merged.get(k, 0) + int(count)
    if not merged:
        return "<p class='muted'>No queue-wait samples in this export.</p>"
    k0, k1 = min(merged), max(merged)
    n = k1 - k0 + 1
    y_max = max(merged.values())
    bw = (W - PAD_L - PAD_R) / n
    body: list[str] = []
    _axis(body, y_max, "connections")
    for i, k in enumerate(range(k0, k1 + 1)):
        c = merged.get(k, 0)
        h = (H - PAD_T - PAD_B) * c / y_max
        x = PAD_L + i * bw
        body.append(f'<rect x="{x + 1:.1f}" y="{H - PAD_B - h:.1f}" width="{max(1, bw - 2):.1f}" '
                    f'height="{h:.1f}" fill="{COLORS[0]}">'
                    f'<title>{_us(2 ** (k / 2) / 1000)}: {c}</title></rect>')
        if i % max(1, n // 8) == 0:
            body.append(f'<text x="{x + bw / 2:.1f}" y="{H - PAD_B + 14}" text-anchor="middle">'
                        f'{_us(2 ** (k / 2) / 1000)}</text>')
    return _svg(body, H, "accept-queue wait distribution")


def inflight_bars(workers: list[dict[str, Any]]) -> str:
    rows = [w for w in workers if w.get("inflight")]
    if not rows:
        return "<p class='muted'>No in-flight data in this export.</p>"
    rows = sorted(rows, key=lambda w: -int(w["inflight"].get("max") or 0))[:32]
    y_max = max([int(w["inflight"].get("max") or 0) for w in rows] + [1])
    bw = (W - PAD_L - PAD_R) / len(rows)
    body: list[str] = []
    _axis(body, y_max, "max open connections")
    for i, w in enumerate(rows):
        m = int(w["inflight"].get("max") or 0)
        h = (H - PAD_T - PAD_B) * m / y_max
        x = PAD_L + i * bw
        color = "#c62828" if m > 1 else COLORS[0]
        body.append(f'<rect x="{x + 2:.1f}" y="{H - PAD_B - h:.1f}" width="{max(1, bw - 4):.1f}" '
                    f'height="{h:.1f}" fill="{color}"/>')
        if len(rows) <= 16:
            body.append(f'<text x="{x + bw / 2:.1f}" y="{H - PAD_B + 14}" text-anchor="middle">'
                        f'{_e(w["pid"])}</text>')
    return _svg(body, H, "in-flight connections per worker")


def _worker_table(workers: list[dict[str, Any]]) -> str:
    head = ("<tr><th>pid</th><th>accepts</th><th>share</th><th>wait p50</th><th>p99</th><th>max</th>"
            "<th>in-flight max</th><th>busy accepts</th><th>state</th></tr>")
    rows = []
    for w in sorted(workers, key=lambda w: int(w["pid"]))[:256]:
        q = w.get("queue_wait_us") or {}
        inf = w.get("inflight") or {}
        rows.append(
            f"<tr><td>{_e(w['pid'])}</td><td>{_num(int(w.get('accepts') or 0))}</td>"
            f"<td>{float(w.get('share') or 0) * 100:.1f} %</td><td>{_us(q.get('p50'))}</td>"
            f"<td>{_us(q.get('p99'))}</td><td>{_us(q.get('max'))}</td><td>{_num(inf.get('max'))}</td>"
            f"<td>{_num(inf.get('busy_accepts'))}</td>"
            f"<td>{'alive' if w.get('alive', True) else 'exited'}"
            f"{' (master)' if w.get('role') == 'master' else ''}</td></tr>")
    more = f"<p class='muted'>… {len(workers) - 256} more workers</p>" if len(workers) > 256 else ""
    return f"<table>{head}{''.join(rows)}</table>{more}"


def _listener_table(listeners: list[dict[str, Any]]) -> str:
    rows = []
    for lst in listeners:
        q = lst.get("queue_depth") or {}
        rows.append(f"<tr><td>{_e(lst.get('address'))}:{_e(lst.get('port'))}</td>"
                    f"<td>{_e(lst.get('mode'))}</td>"
                    f"<td>{len(lst.get('pids') or [])}</td><td>{_num(lst.get('accepts'))}</td>"
                    f"<td>{_num(q.get('max'))}</td><td>{_num(q.get('limit'))}</td></tr>")
    return ("<table><tr><th>listener</th><th>mode</th><th>processes</th><th>accepts</th>"
            f"<th>queue max</th><th>limit</th></tr>{''.join(rows)}</table>")


def render_html(doc: dict[str, Any], result: dict[str, Any]) -> str:
    workers = doc.get("workers") or []
    verdict = result.get("verdict") or {}
    fair = result.get("fairness") or {}
    losses = int(doc.get("lost_events") or 0) + int(doc.get("unattributed") or 0)
    loss_line = (f"<p class='loud'>{_num(doc.get('unattributed'))} connection(s) unattributed, "
                 f"{_num(doc.get('lost_events'))} per-connection event(s) lost</p>") if losses else ""
    flags = "".join(f"<li class='flag'>{_e(f.get('message', f))}</li>" for f in result.get("flags") or [])
    mode_counts = (result.get("wait_modes") or {}).get("counts") or {}
    modes = {m: c for m, c in mode_counts.items() if m != "unknown"}
    figures = [("Jain", fair.get("jain")), ("max/mean", fair.get("max_mean_ratio")), ("CV", fair.get("cv")),
               ("Gini", fair.get("gini")), ("chi-square p (even split)", fair.get("chi2_p"))]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>accept-watch report — pid {_e(doc.get('master_pid'))}</title>
<style>{CSS}</style></head><body>
<h1>accept-watch report</h1>
<p class="muted">master {_e(doc.get('master_pid'))} <code>{_e(doc.get('master_cmdline', ''))}</code><br>
probe {_e(doc.get('probe'))} · kernel {_e(doc.get('kernel', '?'))} · {_e(doc.get('started_at', '?'))} →
{_e(doc.get('ended_at') or 'running')} ({_num(doc.get('duration_s'))} s) ·
{_num(int(doc.get('total_accepts') or 0))} accepts · lost {_num(doc.get('lost_events'))} ·
unattributed {_num(doc.get('unattributed'))}</p>
{loss_line}
<p class="verdict">{_e(verdict.get('sentence', 'No verdict.'))}</p>
<p class="figs">{''.join(f'<span>{_e(k)} <b>{_num(v)}</b></span>' for k, v in figures)}
<span>pattern <b>{_e(verdict.get('pattern', '?'))}</b> ({_e(verdict.get('confidence', '?'))})</span>
<span>workers wait in <b>{_e(', '.join(f'{m} ({c})' for m, c in sorted(modes.items())) or '?')}</b></span></p>
<ul>{flags}</ul>
<h2>Share of accepts per worker</h2>{share_bars(workers)}
<h2>Accepts per second</h2>{rate_lines(doc)}
<h2>Time in the accept queue</h2>{wait_histogram(workers)}
<h2>In-flight connections (accepted, not yet closed by the worker)</h2>{inflight_bars(workers)}
<h2>Listeners</h2>{_listener_table(doc.get('listeners') or [])}
<h2>Workers</h2>{_worker_table(workers)}
<p class="muted">accept-watch {_e(doc.get('tool_version', '?'))} · {_e(doc.get('schema'))}</p>
</body></html>
"""
