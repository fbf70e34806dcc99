"""The HTML report's drawing kit: page constants, number formatting, SVG primitives and the plot area.

Everything here returns strings (escaped) for daemon/report_html.py, which composes the charts and the
page; nothing here reads a document.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .fmt import fmt_ns

PLOT_W = 1000
PAD_L, PAD_R, PAD_T, PAD_B = 70, 24, 28, 48
TOP_N = 8  # series in the rate plot before the rest are summed as "others"
ROWS_MAX = 64  # up to this many workers, the share plot has one labelled row per worker
BINS_PER_DECADE = 10  # queue-wait histogram resolution on its log axis
# Tableau 10: distinguishable when stacked, and in greyscale print.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7")
OTHERS = "#b9b3ad"
BLUE, ORANGE, PALE, GREY, RED, INK, MUTED, GRID = (
    "#4e79a7", "#e8772e", "#a9c1dc", "#c3c8cf", "#c62828", "#1d2430", "#5f6b7a", "#e6e9ee",
)

# ---------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _us(us: float | None) -> str:
    return "–" if us is None else fmt_ns(us * 1000)


def _tick_label(v: float) -> str:
    return f"{round(v):,}" if abs(v - round(v)) < 1e-9 else f"{v:g}"


def nice_ticks(vmax: float, target: int = 5, integer: bool = False) -> list[float]:
    """0, step, 2*step ... up to the first tick >= vmax, with step 1, 2, 2.5 or 5 times a power of 10."""
    vmax = vmax if vmax > 0 else 1.0
    raw = vmax / target
    mag = 10 ** math.floor(math.log10(raw))
    mults = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in mults if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(round(step)))
    n = max(1, math.ceil(vmax / step - 1e-9))
    return [round(i * step, 12) for i in range(n + 1)]


def log_ticks(lo: float, hi: float) -> list[tuple[float, bool]]:
    """Ticks (value, labelled) on a log axis from lo to hi: every decade, plus 2 and 5 when the axis
    spans few decades (labelled only when it spans at most two)."""
    d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    span = d1 - d0
    out: list[tuple[float, bool]] = []
    for d in range(d0, d1 + 1):
        for m in (1, 2, 5):
            v = m * 10.0**d
            if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9) and (m == 1 or span <= 4):
                out.append((v, m == 1 or span <= 2))
    return out


def _label_every(n: int, room: int = 20) -> int:
    """Label every k-th of n columns so that at most `room` labels are drawn."""
    return max(1, math.ceil(n / room))


# ---------------------------------------------------------------------------------------------------
# SVG plumbing
# ---------------------------------------------------------------------------------------------------


def _svg(kind: str, height: float, body: Iterable[str], label: str) -> str:
    h = math.ceil(height)
    return (
        f'<svg class="plot" data-plot="{kind}" viewBox="0 0 {PLOT_W} {h}" width="{PLOT_W}" height="{h}" '
        f'role="img" aria-label="{_e(label)}" font-family="system-ui,sans-serif" font-size="12" '
        f'fill="{INK}"><title>{_e(label)}</title>{"".join(body)}</svg>'
    )


def _empty_svg(kind: str, label: str, message: str) -> str:
    body = [
        f'<rect x="0.5" y="0.5" width="{PLOT_W - 1}" height="69" fill="#fafbfc" stroke="{GRID}"/>',
        f'<text x="{PLOT_W / 2}" y="40" text-anchor="middle" fill="{MUTED}">{_e(message)}</text>',
    ]
    return _svg(kind, 70, body, label)


def _text(x: float, y: float, s: str, anchor: str = "start", **attrs: Any) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{_e(v)}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{_e(s)}</text>'


def _line(x0: float, x1: float, y0: float, y1: float, color: str, dash: str | None, width: float) -> str:
    d = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{y0:.1f}" y2="{y1:.1f}" stroke="{color}" '
            f'stroke-width="{width}"{d}/>')


def _hline(x0: float, x1: float, y: float, color: str = GRID, dash: str | None = None,
           width: float = 1) -> str:
    return _line(x0, x1, y, y, color, dash, width)


def _vline(x: float, y0: float, y1: float, color: str = GRID, dash: str | None = None,
           width: float = 1) -> str:
    return _line(x, x, y0, y1, color, dash, width)


def _rect(x: float, y: float, w: float, h: float, fill: str, title: str | None = None) -> str:
    shape = f'x="{x:.2f}" y="{y:.2f}" width="{max(w, 0.0):.2f}" height="{max(h, 0.0):.2f}" fill="{fill}"'
    return f"<rect {shape}><title>{_e(title)}</title></rect>" if title else f"<rect {shape}/>"


class _Area:
    """The plot area of one SVG: maps data to pixels for a linear or log10 y axis."""

    def __init__(self, height: float, *, left: float = PAD_L, right: float = PAD_R, top: float = PAD_T,
                 bottom: float = PAD_B) -> None:
        self.height = height
        self.x0, self.x1 = left, PLOT_W - right
        self.y0, self.y1 = top, height - bottom  # y0 is the top edge

    @property
    def w(self) -> float:
        return self.x1 - self.x0

    @property
    def h(self) -> float:
        return self.y1 - self.y0

    def y_lin(self, v: float, vmax: float) -> float:
        return self.y1 - self.h * (v / vmax if vmax > 0 else 0)

    def y_grid(self, body: list[str], ticks: Sequence[float], fmt: Callable[[float], str],
               label: str, label_y: float | None = None) -> None:
        for v in ticks:
            y = self.y_lin(v, ticks[-1])
            body.append(_hline(self.x0, self.x1, y, GRID if v else "#9aa3ad"))
            body.append(_text(self.x0 - 6, y + 4, fmt(v), "end", fill=MUTED))
        body.append(_text(self.x0, self.y0 - 10 if label_y is None else label_y, label, fill=MUTED))
