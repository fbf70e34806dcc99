"""Table cells of docs/benchmarks.md: ratios to the baseline as signed %, medians, verdict counts."""

from __future__ import annotations


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def ms_cell(v: float) -> str:
    return f"{v:.2f}"


def ratio_cell(s: dict[str, float] | None, invert: bool = False) -> str:
    """A ratio to the baseline as a signed % change: median [min, max]."""
    if s is None:
        return "—"

    def f(x: float) -> str:
        return f"{100 * (x - 1):+.1f}"

    return f"{f(s['median'])} % [{f(s['min'])}, {f(s['max'])}]"


def median_cell(s: dict[str, float] | None, fmt: str = "{:.1f}") -> str:
    return "—" if s is None else fmt.format(s["median"])


def verdict_cell(v: dict[str, int]) -> str:
    if not v:
        return "—"
    return ", ".join(f"{k} {n}" for k, n in sorted(v.items()))


