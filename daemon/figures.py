"""Fairness figures: Jain, max/mean, CV, Gini, chi-square against an expected split.

Pure Python, no scipy: the chi-square tail is computed from the regularized upper incomplete gamma
function (Numerical Recipes, 3rd ed., section 6.2: series for x < a + 1, Lentz continued fraction
otherwise).

Figures are taken over each worker's accepts relative to what it was owed (daemon/fairshare.py: its
fair share of the accepts made while it was live); with no churn that is the plain even split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Ratios to fair share are judged only for workers owed at least this many accepts: a worker that
# lived for a moment (owed 2, got 0) says nothing (Cochran's rule for the chi-square cells, too).
MIN_EXPECTED_FOR_RATIO = 5.0

# ---------------------------------------------------------------------------------------------------
# Chi-square tail
# ---------------------------------------------------------------------------------------------------
_EPS = 1e-15
_FPMIN = 1e-300


def _max_iter(a: float) -> int:
    # Both expansions converge in O(sqrt(a)) terms near x ~ a (NR 6.2); leave generous room.
    return 1000 + int(50 * math.sqrt(a))


def _gamma_series_p(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x) by its series; converges fast for x < a + 1."""
    ap = a
    term = total = 1.0 / a
    for _ in range(_max_iter(a)):
        ap += 1.0
        term *= x / ap
        total += term
        if abs(term) < abs(total) * _EPS:
            return total * math.exp(-x + a * math.log(x) - math.lgamma(a))
    raise ArithmeticError(f"incomplete gamma series did not converge (a={a}, x={x})")


def _gamma_cf_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) by its continued fraction (modified Lentz); x >= a + 1."""
    b = x + 1.0 - a
    c = 1.0 / _FPMIN
    d = 1.0 / b
    h = d
    for i in range(1, _max_iter(a) + 1):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < _FPMIN:
            d = _FPMIN
        c = b + an / c
        if abs(c) < _FPMIN:
            c = _FPMIN
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h
    raise ArithmeticError(f"incomplete gamma continued fraction did not converge (a={a}, x={x})")


def regularized_gamma_q(a: float, x: float) -> float:
    """Q(a, x) = Gamma(a, x) / Gamma(a), for a > 0, x >= 0."""
    if not a > 0 or math.isinf(a):
        raise ValueError(f"regularized_gamma_q: a must be a positive finite number, got {a}")
    if not x >= 0:
        raise ValueError(f"regularized_gamma_q: x must be >= 0, got {x}")
    if x == 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    if x < a + 1.0:
        return max(0.0, 1.0 - _gamma_series_p(a, x))
    return _gamma_cf_q(a, x)


def chi2_sf(x: float, df: float) -> float:
    """Survival function of the chi-square distribution: P(X >= x) with df degrees of freedom."""
    if not df > 0:
        raise ValueError(f"chi2_sf: degrees of freedom must be > 0, got {df}")
    if not x >= 0:
        raise ValueError(f"chi2_sf: statistic must be >= 0, got {x}")
    return regularized_gamma_q(df / 2.0, x / 2.0)


# ---------------------------------------------------------------------------------------------------
# Fairness over a counts vector
# ---------------------------------------------------------------------------------------------------


def _check_counts(counts: Sequence[int] | Sequence[float]) -> list[float]:
    values = list(counts)
    if not values:
        raise ValueError("fairness: the counts vector is empty (no workers)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0 or math.isinf(v):
            raise ValueError(f"fairness: counts must be non-negative numbers, got {v!r}")
    return [float(v) for v in values]


def jain_index(counts: Sequence[float]) -> float | None:
    """(sum x)^2 / (n * sum x^2): 1.0 for an even split, 1/n when one worker takes everything."""
    xs = _check_counts(counts)
    squares = sum(v * v for v in xs)
    if squares == 0:
        return None
    return sum(xs) ** 2 / (len(xs) * squares)


def max_mean_ratio(counts: Sequence[float]) -> float | None:
    """Largest count over the mean: how many fair shares the busiest worker takes."""
    xs = _check_counts(counts)
    total = sum(xs)
    if total == 0:
        return None
    return max(xs) / (total / len(xs))


def coefficient_of_variation(counts: Sequence[float]) -> float | None:
    """Population standard deviation over the mean (0 for an even split)."""
    xs = _check_counts(counts)
    total = sum(xs)
    if total == 0:
        return None
    mean = total / len(xs)
    return math.sqrt(sum((v - mean) ** 2 for v in xs) / len(xs)) / mean


def gini(counts: Sequence[float]) -> float | None:
    """Gini coefficient: 0 for an even split, (n-1)/n when one worker takes everything."""
    xs = sorted(_check_counts(counts))
    total = sum(xs)
    if total == 0:
        return None
    n = len(xs)
    weighted = sum((i + 1) * v for i, v in enumerate(xs))
    return 2.0 * weighted / (n * total) - (n + 1.0) / n


def chi_square_even(counts: Sequence[float]) -> tuple[float, int, float] | None:
    """Pearson chi-square against an even split: (statistic, degrees of freedom, p-value).

    None when undefined (fewer than two workers or no accepts).
    """
    xs = _check_counts(counts)
    total = sum(xs)
    if total == 0 or len(xs) < 2:
        return None
    expected = total / len(xs)
    stat = sum((v - expected) ** 2 for v in xs) / expected
    df = len(xs) - 1
    return stat, df, chi2_sf(stat, df)


def fairness(counts: Sequence[float]) -> dict[str, Any]:
    """All fairness figures of one counts vector (zeros included: alive workers that got nothing)."""
    xs = _check_counts(counts)
    total = sum(xs)
    chi = chi_square_even(xs)
    return {
        "workers": len(xs),
        "accepts": int(total) if float(total).is_integer() else total,
        "jain": jain_index(xs),
        "max_mean_ratio": max_mean_ratio(xs),
        "cv": coefficient_of_variation(xs),
        "gini": gini(xs),
        "chi2": chi[0] if chi else None,
        "chi2_df": chi[1] if chi else None,
        "chi2_p": chi[2] if chi else None,
        "max_share": max(xs) / total if total else None,
        "min_share": min(xs) / total if total else None,
    }


def chi_square_expected(
    observed: Sequence[float], expected: Sequence[float]
) -> tuple[float, int, float] | None:
    """Pearson goodness of fit of observed counts against expected counts (same total):
    (statistic, degrees of freedom, p-value); None with fewer than two cells."""
    cells = [(o, e) for o, e in zip(observed, expected, strict=True) if e > 0]
    if len(cells) < 2:
        return None
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return stat, df, chi2_sf(stat, df)


def fairness_vs_expected(observed: Mapping[int, int], expected: Mapping[int, float] | None) -> dict[str, Any]:
    """Fairness figures of accepts against what each worker was owed (expected None: an even split).

    The index figures (Jain, CV, Gini, max/mean) are over each worker's ratio to its fair share,
    restricted to workers owed at least MIN_EXPECTED_FOR_RATIO when two or more are.
    """
    pids = sorted(set(observed) | set(expected or {}))
    total = sum(observed.get(p, 0) for p in pids)
    if expected is None or not any(expected.values()):
        exp = {p: total / len(pids) for p in pids} if pids and total else dict.fromkeys(pids, 0.0)
    else:
        owed = sum(expected.get(p, 0.0) for p in pids)
        # Rescale so that expected and observed have the same total (rounding, folded entries).
        exp = {p: expected.get(p, 0.0) * (total / owed) if owed else 0.0 for p in pids}
    judged = [p for p in pids if exp[p] >= MIN_EXPECTED_FOR_RATIO]
    if len(judged) < 2:
        judged = [p for p in pids if exp[p] > 0]
    ratios = [observed.get(p, 0) / exp[p] for p in judged]
    chi = chi_square_expected([observed.get(p, 0) for p in pids], [exp[p] for p in pids])
    shares = [observed.get(p, 0) / total for p in pids] if total else []
    out: dict[str, Any] = {
        "workers": len(pids),
        "accepts": total,
        "jain": jain_index(ratios) if ratios else None,
        "max_mean_ratio": max(ratios) if ratios else None,
        "min_ratio": min(ratios) if ratios else None,
        "cv": coefficient_of_variation(ratios) if ratios else None,
        "gini": gini(ratios) if ratios else None,
        "chi2": chi[0] if chi else None,
        "chi2_df": chi[1] if chi else None,
        "chi2_p": chi[2] if chi else None,
        "max_share": max(shares) if shares else None,
        "min_share": min(shares) if shares else None,
    }
    out["ratio_by_pid"] = {p: observed.get(p, 0) / exp[p] for p in pids if exp[p] > 0}
    out["fair_share_by_pid"] = {p: exp[p] / total for p in pids} if total else {}
    return out
