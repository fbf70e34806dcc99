"""How figures are written, for every view: durations, times, p-values, percentages, counts.

Two alphabets on purpose: the terminal and `report`'s text use ASCII ("-" for a missing value, "us"),
since a terminal may not render anything else; the HTML report and its SVG charts use "–" and "µs".
The figures are the same either way; `missing` picks the alphabet where a helper serves both.
(explain.pct, "12.3 %" with one decimal always, is the sentence form: the verdict's wording is fixed.)
"""

from __future__ import annotations

from typing import Any

DASH = "–"  # a missing value in HTML/SVG


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def fmt_us(us: float | None) -> str:
    """Terminal columns (ASCII, at most 7 characters); the HTML report writes fmt_ns(us * 1000)."""
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f}us"
    if us < 1_000_000:
        return f"{us / 1000:.1f}ms"
    return f"{us / 1_000_000:.2f}s"


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return DASH
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def fmt_p(p: float | None, missing: str = DASH) -> str:
    """A p-value: underflow to 0 is shown as a bound, not as an impossible exact 0."""
    if p is None:
        return missing
    if p == 0:
        return "< 1e-300"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def fmt_pct(x: float) -> str:
    """A share: one decimal, or two significant digits below 0.1 % (so a tiny share is not "0.0 %")."""
    return f"{x * 100:.1f} %" if x >= 0.001 or x == 0 else f"{x * 100:.2g} %"


def fmt_fig(v: float | None, digits: int = 3, missing: str = DASH) -> str:
    return missing if v is None else f"{v:.{digits}g}"


def fmt_int(v: Any, missing: str = DASH) -> str:
    return missing if v is None else f"{int(v):,}"


def fmt_span(started: Any, ended: Any, arrow: str = "→") -> str:
    """'2026-11-27 01:48:27 → 01:49:08 UTC' from the document's UTC ISO-8601 times."""
    start = str(started)[:19].replace("T", " ") if started else "?"
    if not ended:
        return f"{start} UTC {arrow} still running"
    end = str(ended)[:19].replace("T", " ")
    return f"{start} {arrow} {end[11:] if end[:10] == start[:10] else end} UTC"
