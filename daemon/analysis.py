"""Why a distribution looks the way it does: fairness figures and the accept-sequence pattern.

Pure Python, no scipy: the chi-square tail is computed from the regularized upper incomplete gamma
function (Numerical Recipes, 3rd ed., section 6.2: series for x < a + 1, Lentz continued fraction
otherwise).

Two questions are answered separately, because they have different causes:
  * fairness - how evenly the accepts are shared (Jain, max/mean, CV, Gini, chi-square vs an even split);
  * sequence - who accepts *next*, from the in-kernel (previous pid -> pid) transition counts:
      round-robin     FIFO wake-up (workers blocked in accept()): the next acceptor is rarely the last one;
      concentrated    LIFO wake-up (epoll) or uneven shares: the last acceptor tends to accept again;
      random          independent draws (SO_REUSEPORT hash, workers racing): self-transitions as expected;
      single-acceptor one pid takes >= 99 %;
      even            shares only, no sequence data: round-robin and random cannot be told apart;
      not enough data too few accepts for the tests below to mean anything.
"""

from __future__ import annotations

import math
from collections import Counter as _Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from accept_watch.daemon.waitmode import WaitMode

# ---------------------------------------------------------------------------------------------------
# Thresholds (why these numbers)
# ---------------------------------------------------------------------------------------------------
# Enough data: the chi-square approximation wants >= 5 expected per cell (Cochran's rule) and the
# self-transition z-test wants M*q >= 5 (q ~ 1/n); 10 per worker gives both with a 2x margin. 50 total
# keeps the share resolution at 2 % even for one or two workers.
MIN_PER_WORKER = 10
MIN_TOTAL = 50
# The dashboard re-evaluates every second, so at alpha = 0.05 a truly even server would be called uneven
# every 20 s. 0.001 (chi-square) and |z| >= 3 (two-sided p ~ 0.0027) keep false alarms rare.
ALPHA = 0.001
Z_CRIT = 3.0
# Significance alone is not enough: with millions of accepts a 1 % imbalance is "significant" but not
# worth acting on. An effect must also be material: a worker >= 25 % above or below its fair share, or
# a self-transition rate >= 1.5x (sticky) or <= 0.5x (anti-sticky) its expectation.
MATERIAL_SHARE = 0.25
STICKY_RATIO = 1.5
ANTI_STICKY_RATIO = 0.5
# Evidence this strong (p < 1e-6, |z| >= 5) is called "high" confidence.
STRONG_P = 1e-6
STRONG_Z = 5.0
SINGLE_SHARE = 0.99

PATTERNS = ("round-robin", "concentrated", "random", "single-acceptor", "even", "not enough data")

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


# ---------------------------------------------------------------------------------------------------
# Sequence pattern
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    pattern: str  # one of PATTERNS
    confidence: str  # "low" | "medium" | "high"
    sentence: str  # one plain-language line
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "confidence": self.confidence,
            "sentence": self.sentence,
            "figures": dict(self.figures),
        }


def min_accepts(workers: int) -> int:
    """Accepts needed before a pattern is judged (see MIN_PER_WORKER / MIN_TOTAL)."""
    return max(MIN_TOTAL, MIN_PER_WORKER * workers)


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def _span(low: float, high: float) -> str:
    """ "12.3-12.8 %", or "12.5 %" when both ends round alike."""
    a, b = f"{100.0 * low:.1f}", f"{100.0 * high:.1f}"
    return f"{a} %" if a == b else f"{a}-{b} %"


def _dominant_wait_mode(wait_modes: Mapping[int, str] | None, pids: Iterable[int]) -> str | None:
    """The wait mode shared by most of these workers (None when unknown)."""
    if not wait_modes:
        return None
    modes = _Counter(wait_modes[p] for p in pids if p in wait_modes and wait_modes[p] != "unknown")
    if not modes:
        return None
    return modes.most_common(1)[0][0]


def _why_round_robin(mode: str | None) -> str:
    if mode == "blocking-accept":
        return "workers block in accept() and the kernel wakes them in FIFO order"
    if mode in ("poll/select", "epoll"):
        return (f"workers wait in {mode} but under load each takes the next queued connection as soon as "
                "it finishes one, so they take turns")
    return "the kernel wakes blocked accept() callers in FIFO order"


def _why_concentrated(mode: str | None, taking_turns: bool = False) -> str:
    if taking_turns and mode in ("epoll", "poll/select"):
        # Every waiter is woken; the last acceptor is rarely the winner, so "most recent wins" would
        # contradict the figures.
        return f"typical of {mode} wake-ups: every waiter is woken and the same few workers keep winning"
    if mode == "epoll-exclusive":
        return "EPOLLEXCLUSIVE wakes the first idle waiter in registration order, so early workers win"
    if mode == "blocking-accept":
        return "unusual for blocking accept() (FIFO): check whether the other workers are busy or stuck"
    if mode == "poll/select":
        return "workers race after a poll/select wake-up and the one already running wins"
    return "typical of epoll wake-ups (LIFO: the most recently active worker wins)"


def _why_random(listener_mode: str | None) -> str:
    if listener_mode == "reuseport":
        return "SO_REUSEPORT hashes each connection to one worker's socket"
    if listener_mode == "shared":
        return "workers race for the shared socket and whichever is free first takes the next connection"
    return "typical of SO_REUSEPORT hashing or of workers racing for the socket"


def classify(
    counts: Mapping[int, int],
    transitions: Mapping[tuple[int, int], int] | None,
    *,
    listener_mode: str | None = None,
    wait_modes: Mapping[int, str] | None = None,
) -> Verdict:
    """Classify one port's accept pattern.

    counts: pid -> accepts on this port, zeros included for workers that hold the socket but got nothing.
    transitions: (previous pid, pid) -> count, or None when no sequence data exists. A previous pid of 0
    marks the first accept (no predecessor): it counts for shares, not for the self-transition test.
    listener_mode / wait_modes only choose the wording of the "why".
    """
    if not counts:
        raise ValueError("classify: no workers for this port")
    for pid, c in counts.items():
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"classify: accepts of pid {pid} must be a non-negative integer, got {c!r}")
    for key, c in (transitions or {}).items():
        if len(key) != 2 or isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"classify: transition {key!r} must map to a non-negative integer, got {c!r}")
    pids = sorted(counts)
    n = len(pids)
    vector = [counts[p] for p in pids]
    total = sum(vector)
    need = min_accepts(n)
    figures: dict[str, Any] = {"workers": n, "accepts": total, "min_accepts": need}

    if total < need:
        return Verdict(
            "not enough data",
            "low",
            f"Not enough data: {total} accepts over {n} worker{'s' if n != 1 else ''}; at least {need} "
            f"are needed ({MIN_PER_WORKER} per worker, {MIN_TOTAL} minimum) to judge the pattern.",
            figures,
        )

    fair = fairness(vector)
    shares = {p: counts[p] / total for p in pids}
    top_pid = max(pids, key=lambda p: (counts[p], -p))
    top_share = shares[top_pid]
    idle = [p for p in pids if counts[p] == 0]
    figures.update(
        {
            "jain": fair["jain"],
            "max_mean_ratio": fair["max_mean_ratio"],
            "cv": fair["cv"],
            "gini": fair["gini"],
            "chi2": fair["chi2"],
            "chi2_df": fair["chi2_df"],
            "chi2_p": fair["chi2_p"],
            "top_pid": top_pid,
            "top_share": top_share,
            "min_share": fair["min_share"],
            "idle_workers": len(idle),
        }
    )
    mode = _dominant_wait_mode(wait_modes, pids)
    if mode is not None:
        figures["wait_mode"] = mode

    if n == 1:
        return Verdict(
            "single-acceptor",
            "high",
            f"Single acceptor: only process {top_pid} accepts on this port ({total} accepts); "
            "no other worker holds the socket.",
            figures,
        )
    if top_share >= SINGLE_SHARE:
        return Verdict(
            "single-acceptor",
            "high",
            f"Single acceptor: worker {top_pid} took {_pct(top_share)} of {total} accepts while "
            f"{n - 1} other workers waited; {_why_concentrated(mode)}.",
            figures,
        )

    # Evenness: significant (chi-square) and material (a worker >= 25 % off its fair share).
    max_ratio = fair["max_mean_ratio"]
    min_ratio = fair["min_share"] * n
    p_even = fair["chi2_p"]
    uneven_material = max_ratio >= 1 + MATERIAL_SHARE or min_ratio <= 1 - MATERIAL_SHARE
    uneven = p_even < ALPHA and uneven_material
    low_share, high_share = min(shares.values()), max(shares.values())

    # Sequence: the number of self-transitions S among M transitions with a known predecessor, against
    # its expectation if each accept were an independent draw from the observed shares,
    # q = sum(p_i^2) (= 1/n for an even split). Binomial(M, q) -> z = (S - Mq) / sqrt(Mq(1-q)).
    # (Consecutive self-indicators are not exactly independent for uneven shares; the binomial is the
    # usual, slightly liberal, approximation and the materiality ratio guards against over-reading it.)
    if transitions is None:
        figures["sequence"] = False
        if uneven:
            return _concentrated(
                figures, n, top_pid, top_share, idle, None, p_even, mode=mode, listener_mode=listener_mode
            )
        conf = "high" if p_even >= 0.01 else ("medium" if p_even >= ALPHA else "low")
        return Verdict(
            "even",
            conf,
            f"Even split: {n} workers took {_span(low_share, high_share)} (Jain {fair['jain']:.3f}, "
            f"chi-square p={p_even:.2g}); no accept-sequence data, so round-robin and random cannot be "
            "told apart.",
            figures,
        )

    m = 0
    self_count = 0
    best_successor: dict[int, int] = {}
    for (prev, cur), c in transitions.items():
        if prev == 0:
            continue
        m += c
        if prev == cur:
            self_count += c
        best_successor[prev] = max(best_successor.get(prev, 0), c)
    q = sum(s * s for s in shares.values())
    figures["sequence"] = True
    figures["transitions"] = m
    if m == 0:
        figures["self_rate"] = None
        return Verdict(
            "not enough data",
            "low",
            f"Not enough data: {total} accepts but no consecutive pair on this port was recorded.",
            figures,
        )
    self_rate = self_count / m
    expected = m * q
    var = m * q * (1.0 - q)
    z = (self_count - expected) / math.sqrt(var) if var > 0 else None
    # Fraction of transitions that go to each predecessor's most frequent successor: ~1 when successors
    # cycle in a fixed order, a little above 1/n when they are independent.
    determinism = sum(best_successor.values()) / m
    figures.update(
        {
            "self_transitions": self_count,
            "self_rate": self_rate,
            "self_expected": q,
            "self_z": z,
            "self_ratio": self_rate / q if q > 0 else None,
            "successor_determinism": determinism,
        }
    )
    ratio = self_rate / q
    sticky = z is not None and z >= Z_CRIT and ratio >= STICKY_RATIO
    anti_sticky = z is not None and z <= -Z_CRIT and ratio <= ANTI_STICKY_RATIO

    if uneven or sticky:
        seq = (self_rate, q, z) if sticky else None
        p_uneven = p_even if uneven else None
        turns = (self_rate, q) if anti_sticky else None
        return _concentrated(
            figures, n, top_pid, top_share, idle, seq, p_uneven, mode=mode, listener_mode=listener_mode,
            turns=turns,
        )

    if anti_sticky:
        strong = z is not None and z <= -STRONG_Z and not uneven_material
        cycle = (
            f", successors cycle in a fixed order {_pct(determinism)} of the time"
            if determinism >= 0.8
            else ""
        )
        return Verdict(
            "round-robin",
            "high" if strong else "medium",
            f"Round-robin-like: {n} workers each took {_span(low_share, high_share)} "
            f"(Jain {fair['jain']:.3f}); the same worker accepts twice in a row {_pct(self_rate)} "
            f"of the time ({_pct(q)} if independent){cycle} - {_why_round_robin(mode)}.",
            figures,
        )

    # Random: neither material unevenness nor material (anti-)stickiness. Confidence drops when a test is
    # significant but its effect too small to name.
    notes = []
    if p_even < ALPHA:
        notes.append(f"shares are slightly uneven (chi-square p={p_even:.2g}, max {max_ratio:.2f}x fair)")
    if z is not None and z >= Z_CRIT:
        notes.append(f"slightly sticky (z={z:.1f})")
    elif z is not None and z <= -Z_CRIT:
        notes.append(f"leans round-robin (z={z:.1f})")
    if notes:
        conf = "low"
    elif p_even >= 0.01 and z is not None and abs(z) < 2.0:
        conf = "high"
    else:
        conf = "medium"
    extra = f"; {', '.join(notes)}" if notes else ""
    return Verdict(
        "random",
        conf,
        f"Random-like: {n} workers took {_span(low_share, high_share)} (chi-square p={p_even:.2g}) and "
        f"the next acceptor is independent of the last (same worker {_pct(self_rate)}, {_pct(q)} expected)"
        f"{extra} - {_why_random(listener_mode)}.",
        figures,
    )


def _concentrated(
    figures: dict[str, Any],
    n: int,
    top_pid: int,
    top_share: float,
    idle: list[int],
    seq: tuple[float, float, float | None] | None,
    p_uneven: float | None,
    *,
    mode: str | None,
    listener_mode: str | None,
    turns: tuple[float, float] | None = None,
) -> Verdict:
    """Verdict for uneven shares (p_uneven given) and/or sticky successions (seq given).

    The sentence leads with the strongest visible cause: a worker well above its share, else idle workers.
    """
    parts = []
    over = top_share * n >= 1 + MATERIAL_SHARE
    if p_uneven is not None:
        if over:
            share_part = f"worker {top_pid} takes {_pct(top_share)} - {top_share * n:.1f}x its fair share"
            if idle:
                share_part += f", {len(idle)} of {n} workers got nothing"
        else:
            share_part = f"{len(idle) or 'some'} of {n} workers got {'nothing' if idle else 'too little'}"
        parts.append(share_part)
    if seq is not None:
        self_rate, q, _z = seq
        text = (
            f"consecutive accepts stay on the same worker {_pct(self_rate)} of the time "
            f"({_pct(q)} expected if independent)"
        )
        if p_uneven is None:
            text += ", although the overall shares are close to even"
        parts.append(text)
    if turns is not None:
        # Uneven shares, yet consecutive accepts rarely stay on one worker: the busy few take turns.
        parts.append(
            f"the same worker accepts twice in a row only {_pct(turns[0])} of the time "
            f"({_pct(turns[1])} if independent), so the busy workers take turns"
        )
    if seq is None and over and listener_mode == "reuseport":
        why = "SO_REUSEPORT hashes each connection to a socket, and few distinct clients load some more"
    elif seq is None and over and mode is None:
        # Uneven but not sticky: no sign of LIFO; name the usual suspects without claiming one.
        why = "some workers win the wake-ups more often (wake-up order, CPU placement or slower workers)"
    elif seq is not None or over:
        why = _why_concentrated(mode, taking_turns=turns is not None)
    else:
        who = "that worker is" if len(idle) == 1 else "those workers are"
        why = f"check whether {who} stuck, busy, or not accepting on this socket"
    strong = (p_uneven is not None and p_uneven < STRONG_P) or (
        seq is not None and seq[2] is not None and seq[2] >= STRONG_Z
    )
    return Verdict(
        "concentrated",
        "high" if strong else "medium",
        f"Concentrated: {'; '.join(parts)}; {why}.",
        figures,
    )


# ---------------------------------------------------------------------------------------------------
# The "analysis" section of the snapshot document
# ---------------------------------------------------------------------------------------------------


def _int_field(obj: Mapping[str, Any], key: str, where: str, *, minimum: int | None = None) -> int:
    if key not in obj:
        raise ValueError(f"analysis: {where} has no {key!r}")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"analysis: {where}.{key} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"analysis: {where}.{key} must be >= {minimum}, got {v}")
    return v


def _list_field(doc: Mapping[str, Any], key: str) -> list[Any]:
    if key not in doc:
        raise ValueError(f"analysis: the snapshot has no {key!r}")
    v = doc[key]
    if not isinstance(v, list):
        raise ValueError(f"analysis: {key!r} must be a list, got {type(v).__name__}")
    for i, item in enumerate(v):
        if not isinstance(item, dict):
            raise ValueError(f"analysis: {key}[{i}] must be an object, got {type(item).__name__}")
    return v


def _wait_mode_entry(pid: Any, wm: Any) -> tuple[int, dict[str, str]]:
    try:
        ipid = int(pid)
    except (TypeError, ValueError):
        raise ValueError(f"analysis: wait_modes key must be a pid, got {pid!r}") from None
    if isinstance(wm, WaitMode):
        return ipid, wm.to_dict()
    if isinstance(wm, Mapping) and isinstance(wm.get("mode"), str):
        return ipid, {"mode": wm["mode"], "detail": str(wm.get("detail", ""))}
    raise ValueError(f"analysis: wait mode of pid {pid} must be a WaitMode or {{'mode': ...}}, got {wm!r}")


def _window_fairness(
    rate_history: list[Any], window_s: float, alive_workers: Iterable[int]
) -> dict[str, Any] | None:
    """Fairness over the rate_history entries of the last window_s seconds (None without history)."""
    if not rate_history:
        return None
    t_last = rate_history[-1][0]
    summed: dict[int, int] = dict.fromkeys(alive_workers, 0)
    seconds = 0
    for t, per_pid in rate_history:
        if t <= t_last - window_s:
            continue
        seconds += 1
        for pid, c in per_pid.items():
            summed[int(pid)] = summed.get(int(pid), 0) + c
    if not summed:
        return None
    pids = sorted(summed)
    out = fairness([summed[p] for p in pids])
    out["seconds"] = seconds
    return out


def _check_rate_history(doc: Mapping[str, Any]) -> list[Any]:
    history = doc.get("rate_history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise ValueError("analysis: 'rate_history' must be a list")
    for i, entry in enumerate(history):
        if (
            not isinstance(entry, list | tuple)
            or len(entry) != 2
            or isinstance(entry[0], bool)
            or not isinstance(entry[0], int | float)
            or not isinstance(entry[1], dict)
        ):
            raise ValueError(f"analysis: rate_history[{i}] must be [seconds, {{pid: count}}], got {entry!r}")
        for pid, c in entry[1].items():
            if not str(pid).isdigit() or isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ValueError(f"analysis: rate_history[{i}] has a bad entry {pid!r}: {c!r}")
    return sorted(history, key=lambda e: e[0])


# A worker that accepted at least this many connections while already holding another open one
# queues requests inside itself (asyncio servers accept as fast as they can): the kernel's accept
# queue looks empty while requests wait in the busy worker. One such accept can be a keep-alive
# client lingering; a handful is a pattern.
INFLIGHT_BUSY_MIN = 3
# ... and "many" open connections: two at once is a client that has not closed yet, three is a queue.
INFLIGHT_MAX_MIN = 3


def inflight_flagged(inf: Mapping[str, Any]) -> bool:
    return (int(inf.get("busy_accepts") or 0) >= INFLIGHT_BUSY_MIN
            and int(inf.get("max") or 0) >= INFLIGHT_MAX_MIN)


def _inflight_flags(workers: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    busy = [w for w in workers if inflight_flagged(w.get("inflight") or {})]
    if not busy:
        return []
    busy.sort(key=lambda w: -int(w["inflight"]["max"]))
    top = busy[0]
    inf = top["inflight"]
    others = f" (and {len(busy) - 1} more worker(s))" if len(busy) > 1 else ""
    return [{
        "code": "inflight_queueing",
        "message": f"worker {top['pid']} accepted {inf['busy_accepts']} connection(s) while already holding "
        f"open ones, up to {inf['max']} at once{others}: requests wait inside the worker, "
        "where the accept queue does not show them.",
    }]


def analyze(doc: Mapping[str, Any], wait_modes: Mapping[Any, Any] | None = None) -> dict[str, Any]:
    """Build the snapshot document's "analysis" section (JSON-serializable).

    wait_modes: pid -> WaitMode (or {"mode", "detail"}), e.g. from waitmode.detect_wait_mode; optional.
    """
    if not isinstance(doc, Mapping):
        raise ValueError(f"analysis: the snapshot must be an object, got {type(doc).__name__}")
    workers = _list_field(doc, "workers")
    listeners = _list_field(doc, "listeners")
    transitions = _list_field(doc, "transitions")
    history = _check_rate_history(doc)

    accepts: dict[int, int] = {}
    role: dict[int, str] = {}
    alive: dict[int, bool] = {}
    for i, w in enumerate(workers):
        pid = _int_field(w, "pid", f"workers[{i}]", minimum=1)
        if pid in accepts:
            raise ValueError(f"analysis: pid {pid} appears twice in workers")
        accepts[pid] = _int_field(w, "accepts", f"workers[{i}]", minimum=0)
        role[pid] = str(w.get("role", "worker"))
        alive[pid] = bool(w.get("alive", True))

    modes: dict[int, dict[str, str]] = dict(_wait_mode_entry(p, wm) for p, wm in (wait_modes or {}).items())
    mode_names = {p: m["mode"] for p, m in modes.items()}

    # Who competes: alive workers (zero accepts included: they were there and got nothing) plus any
    # process that did accept (a master that accepts, a worker that has since exited).
    def competes(pid: int) -> bool:
        if accepts.get(pid, 0) > 0:
            return True
        return alive.get(pid, True) and role.get(pid, "worker") != "master"

    overall_pids = sorted(p for p in accepts if competes(p))
    flags: list[dict[str, str]] = []
    fair: dict[str, Any]
    if overall_pids:
        fair = fairness([accepts[p] for p in overall_pids])
    else:
        # Same keys as fairness(), all undefined: nothing to be fair about yet.
        fair = {k: None for k in fairness([0])} | {"workers": 0, "accepts": 0}
    fair["windows"] = {
        f"{w}s": _window_fairness(history, w, (p for p in overall_pids if alive.get(p, True)))
        for w in (10, 60)
    }

    # Per-port transitions.
    by_port: dict[int, dict[tuple[int, int], int]] = {}
    for i, t in enumerate(transitions):
        where = f"transitions[{i}]"
        port = _int_field(t, "port", where, minimum=0)
        prev = _int_field(t, "from", where, minimum=0)
        cur = _int_field(t, "to", where, minimum=1)
        c = _int_field(t, "count", where, minimum=0)
        key = (prev, cur)
        by_port.setdefault(port, {})
        by_port[port][key] = by_port[port].get(key, 0) + c

    port_pids: dict[int, set[int]] = {}
    port_mode: dict[int, str] = {}
    port_accepts: dict[int, int] = {}
    for i, lst in enumerate(listeners):
        port = _int_field(lst, "port", f"listeners[{i}]", minimum=0)
        pids = lst.get("pids", [])
        if not isinstance(pids, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in pids
        ):
            raise ValueError(f"analysis: listeners[{i}].pids must be a list of pids")
        port_pids.setdefault(port, set()).update(p for p in pids if competes(p))
        port_mode[port] = str(lst.get("mode", "")) or port_mode.get(port, "")
        if "accepts" in lst:
            port_accepts[port] = port_accepts.get(port, 0) + _int_field(lst, "accepts", f"listeners[{i}]")
        qd = lst.get("queue_depth") or {}
        if not isinstance(qd, dict):
            raise ValueError(f"analysis: listeners[{i}].queue_depth must be an object")
        q_max, q_limit = qd.get("max"), qd.get("limit")
        if q_max is not None and q_limit is not None:
            _int_field(qd, "max", f"listeners[{i}].queue_depth", minimum=0)
            _int_field(qd, "limit", f"listeners[{i}].queue_depth", minimum=0)
        # 90 %: the queue is about to overflow (SYNs then get dropped or retried).
        if q_max is not None and q_limit and q_max >= 0.9 * q_limit:
            flags.append(
                {
                    "code": "queue_near_limit",
                    "message": f"port {port}: the listen queue reached {qd['max']} of {qd['limit']}; "
                    "new connections may be dropped - workers are not accepting fast enough.",
                }
            )

    ports = sorted(set(port_pids) | set(by_port))
    per_port: dict[str, dict[str, Any]] = {}
    port_totals: dict[int, int] = {}
    for port in ports:
        trans = by_port.get(port)
        # Workers that hold this port's socket; without listener data, every competing worker.
        candidates = set(port_pids[port]) if port in port_pids else set(overall_pids)
        if trans:
            counts = dict.fromkeys(candidates, 0)
            for (_prev, cur), c in trans.items():
                counts[cur] = counts.get(cur, 0) + c
            verdict = classify(counts, trans, listener_mode=port_mode.get(port), wait_modes=mode_names)
        elif len(ports) == 1:
            # One port: the worker totals are this port's counts, but without sequence data.
            counts = {p: accepts.get(p, 0) for p in (candidates | {p for p in overall_pids if accepts[p]})}
            if counts:
                verdict = classify(counts, None, listener_mode=port_mode.get(port), wait_modes=mode_names)
            else:
                # Only a master holds the socket and it has accepted nothing yet (a single-process
                # server before its first connection): nothing to compare, which is not an error.
                verdict = Verdict(
                    "not enough data", "low",
                    f"Not enough data: no process has accepted a connection on port {port} yet, so there "
                    "is no split between workers to judge (a single-process server shows up once it "
                    "accepts).",
                    {"workers": 0, "accepts": 0, "sequence": False},
                )
        else:
            counts = {}
            verdict = Verdict(
                "not enough data",
                "low",
                f"Not enough data: no accept-sequence data for port {port} "
                f"({port_accepts.get(port, 0)} accepts), and worker totals mix several ports.",
                {"workers": len(candidates), "accepts": port_accepts.get(port, 0), "sequence": False},
            )
        port_totals[port] = sum(counts.values())
        per_port[str(port)] = verdict.to_dict()

    if ports:
        busiest = max(ports, key=lambda p: (port_totals[p], -p))
        overall = dict(per_port[str(busiest)])
        overall["port"] = busiest
        if len(ports) > 1:
            overall["sentence"] = f"Port {busiest} (busiest of {len(ports)}): {overall['sentence']}"
    elif overall_pids:
        overall = classify({p: accepts[p] for p in overall_pids}, None, wait_modes=mode_names).to_dict()
        overall["port"] = None
    else:
        overall = Verdict(
            "not enough data", "low", "Not enough data: no workers have been seen yet."
        ).to_dict()
        overall["port"] = None

    # Flags: conditions that change how the figures should be read.
    if overall["pattern"] == "not enough data":
        flags.append({"code": "not_enough_data", "message": overall["sentence"]})
    unattributed = doc.get("unattributed", 0) or 0
    if unattributed:
        flags.append(
            {
                "code": "unattributed",
                "message": f"{unattributed} accepts could not be attributed: counts are not exact.",
            }
        )
    diag = doc.get("diagnostics") or {}
    if isinstance(diag, dict) and diag.get("transitions_map_full"):
        flags.append(
            {
                "code": "transitions_incomplete",
                "message": f"the transition map was full {diag['transitions_map_full']} times: "
                "the sequence pattern is based on incomplete data.",
            }
        )
    total = sum(accepts[p] for p in overall_pids)
    idle = [p for p in overall_pids if accepts[p] == 0 and alive.get(p, True)]
    if idle and total >= min_accepts(len(overall_pids)):
        flags.append(
            {
                "code": "idle_workers",
                "message": f"{len(idle)} of {len(overall_pids)} workers accepted nothing "
                f"out of {total} connections.",
            }
        )
    gone = [p for p in overall_pids if not alive.get(p, True)]
    if gone:
        flags.append(
            {
                "code": "workers_replaced",
                "message": f"{len(gone)} workers that accepted connections have exited (e.g. max_requests "
                "recycling): lifetime shares mix workers of different ages.",
            }
        )
    # A master holds the listener but waits for its workers, not for connections; one that sleeps in
    # select() on a pipe (gunicorn < 27) reads as poll/select in /proc. Its mode is listed, not counted.
    worker_modes = {p: m for p, m in mode_names.items() if competes(p)}
    known = {m for m in worker_modes.values() if m != "unknown"}
    if len(known) > 1:
        flags.append(
            {"code": "wait_mode_mixed", "message": f"workers wait differently: {', '.join(sorted(known))}."}
        )

    flags.extend(_inflight_flags(doc.get("workers") or []))

    summary = _Counter(worker_modes.values())
    return {
        "fairness": fair,
        "per_port": per_port,
        "verdict": overall,
        "wait_modes": {
            "by_pid": {str(p): modes[p] for p in sorted(modes)},
            "counts": dict(sorted(summary.items())),
            "dominant": _dominant_wait_mode(worker_modes, worker_modes) if worker_modes else None,
        },
        "flags": flags,
    }
