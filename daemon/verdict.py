"""One port's verdict: the pattern of who accepts next, against fair shares and a live-aware baseline.

The patterns (daemon/analysis.py says how the document's figures feed them):
  round-robin     the next acceptor is rarely the last one (FIFO wake-up, or busy workers taking turns);
  concentrated    uneven shares, or the last acceptor tends to accept again (LIFO wake-up);
  random          independent draws (SO_REUSEPORT hash, workers racing): self-transitions as expected;
  single-acceptor one pid takes >= 99 %;
  even            shares only, no sequence data: round-robin and random cannot be told apart;
  not enough data too few accepts for the tests below to mean anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .explain import Verdict, dominant_wait_mode, mechanism, pct, span, why
from .figures import fairness_vs_expected

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


def min_accepts(workers: int) -> int:
    """Accepts needed before a pattern is judged (see MIN_PER_WORKER / MIN_TOTAL)."""
    return max(MIN_TOTAL, MIN_PER_WORKER * workers)


def _name(pid: int) -> str:
    return "exited workers" if pid == 0 else f"worker {pid}"


def classify(
    counts: Mapping[int, int],
    transitions: Mapping[tuple[int, int], int] | None,
    *,
    expected: Mapping[int, float] | None = None,
    self_expected: float | None = None,
    live_workers: Mapping[str, Any] | None = None,
    listener_mode: str | None = None,
    wait_modes: Mapping[int, str] | None = None,
    sockets: int | None = None,
    bystanders: int = 0,
) -> Verdict:
    """Classify one port's accept pattern.

    counts: pid -> accepts on this port of the workers able to accept (zeros included; pid 0 = exited
    workers folded together). transitions: (previous pid, pid) -> count, or None without sequence
    data; a previous pid of 0 marks the first accept and is not a pair. expected: pid -> accepts owed
    (fair share while live; None: an even split). self_expected: the same-worker-twice baseline for
    the workers live at each moment (None: sum of squared shares). listener_mode / wait_modes give
    the cause; bystanders: other processes holding the socket that never wait on it.
    """
    if expected is not None and set(expected) - set(counts):
        counts = {**dict.fromkeys(expected, 0), **counts}  # owed accepts, got none
    if not counts:
        return Verdict("not enough data", "low",
                       "Not enough data: no worker has been seen accepting or waiting on this port.",
                       {"workers": 0, "accepts": 0})
    for pid, c in counts.items():
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"classify: accepts of pid {pid} must be a non-negative integer, got {c!r}")
    for key, c in (transitions or {}).items():
        if len(key) != 2 or isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"classify: transition {key!r} must map to a non-negative integer, got {c!r}")
    pids = sorted(counts)
    n = len(pids)
    live_max = int((live_workers or {}).get("max") or n)
    total = sum(counts.values())
    mode = dominant_wait_mode(wait_modes, pids)
    cause, evidence = mechanism(listener_mode, mode, n, sockets)
    need = min_accepts(min(n, live_max))
    figures: dict[str, Any] = {"workers": n, "accepts": total, "min_accepts": need}
    if live_workers:
        figures["live_workers"] = dict(live_workers)
    if mode is not None:
        figures["wait_mode"] = mode

    def verdict(pattern: str, confidence: str, sentence: str) -> Verdict:
        return Verdict(pattern, confidence, sentence, figures, cause, evidence)

    if n == 1 and total == 0:
        return verdict("not enough data", "low",
                       "Not enough data: no process has accepted a connection on this port yet (one process, "
                       f"pid {pids[0]}, waits on it).")
    if n == 1:
        others = (f"; {bystanders} other process{'es' if bystanders != 1 else ''} hold the socket without "
                  "waiting on it (they serve connections handed to them, or supervise)") if bystanders else ""
        return verdict("single-acceptor", "high",
                       f"Single acceptor: only process {pids[0]} accepts on this port ({total} accepts)"
                       f"{others}.")
    if total < need:
        return verdict("not enough data", "low",
                       f"Not enough data: {total} accepts over {n} workers; at least {need} are needed "
                       f"({MIN_PER_WORKER} per worker, {MIN_TOTAL} minimum) to judge the pattern.")

    fair = fairness_vs_expected(dict(counts), dict(expected) if expected is not None else None)
    shares = {p: counts[p] / total for p in pids}
    ratio = fair["ratio_by_pid"]
    top_pid = max(pids, key=lambda p: (counts[p], -p))
    top_share = shares[top_pid]
    over_pid = max(ratio, key=lambda p: (ratio[p], counts[p])) if ratio else top_pid
    idle = [p for p in pids if counts[p] == 0 and p != 0]
    figures.update({k: fair[k] for k in ("jain", "max_mean_ratio", "min_ratio", "cv", "gini", "chi2",
                                         "chi2_df", "chi2_p")})
    figures.update({"top_pid": top_pid, "top_share": top_share, "min_share": fair["min_share"],
                    "idle_workers": len(idle),
                    "fair_share": {str(p): round(s, 4) for p, s in fair["fair_share_by_pid"].items()}})

    if top_share >= SINGLE_SHARE:
        return verdict("single-acceptor", "high",
                       f"Single acceptor: {_name(top_pid)} took {pct(top_share)} of {total} accepts while "
                       f"{n - 1} other workers could have accepted; {why('single-acceptor', cause)}.")

    max_ratio = fair["max_mean_ratio"] or 0.0
    min_ratio = fair["min_ratio"] if fair["min_ratio"] is not None else 1.0
    p_even = fair["chi2_p"] if fair["chi2_p"] is not None else 1.0
    uneven_material = max_ratio >= 1 + MATERIAL_SHARE or min_ratio <= 1 - MATERIAL_SHARE
    uneven = p_even < ALPHA and uneven_material
    low_share, high_share = min(shares.values()), max(shares.values())
    churn = live_workers is not None and (live_workers.get("min") != live_workers.get("max")
                                          or n > live_max)
    live_note = (f" (fair share counted over the {live_workers['min']}-{live_workers['max']} workers live at "
                 "each moment)") if churn and live_workers else ""
    # With workers replaced, shares of the whole run mix generations; each worker against what it was
    # owed while live is the comparable figure.
    took = f"{min_ratio:.2f}-{max_ratio:.2f}x their fair share" if churn else span(low_share, high_share)

    if transitions is None:
        figures["sequence"] = False
        if uneven:
            return _concentrated(verdict, figures, n, over_pid, ratio, shares, idle, None, p_even, cause,
                                 live_note=live_note)
        conf = "high" if p_even >= 0.01 else ("medium" if p_even >= ALPHA else "low")
        return verdict("even", conf,
                       f"Even split: {n} workers took {took} of {total} accepts "
                       f"(Jain {fair['jain']:.3f}, chi-square p={p_even:.2g}){live_note}; no accept-sequence "
                       "data, so round-robin and random cannot be told apart.")

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
    q = self_expected if self_expected is not None else sum(s * s for s in shares.values())
    figures["sequence"] = True
    figures["transitions"] = m
    if m == 0 or not 0 < q < 1:
        figures["self_rate"] = None
        return verdict("not enough data", "low",
                       f"Not enough data: {total} accepts but no consecutive pair on this port was recorded.")
    self_rate = self_count / m
    z = (self_count - m * q) / math.sqrt(m * q * (1.0 - q))
    determinism = sum(best_successor.values()) / m
    figures.update({"self_transitions": self_count, "self_rate": self_rate, "self_expected": q,
                    "self_z": z, "self_ratio": self_rate / q, "successor_determinism": determinism})
    sticky = z >= Z_CRIT and self_rate / q >= STICKY_RATIO
    anti_sticky = z <= -Z_CRIT and self_rate / q <= ANTI_STICKY_RATIO

    if uneven or sticky:
        return _concentrated(verdict, figures, n, over_pid, ratio, shares, idle,
                             (self_rate, q, z) if sticky else None, p_even if uneven else None, cause,
                             turns=(self_rate, q) if anti_sticky else None, live_note=live_note)
    if anti_sticky:
        strong = z <= -STRONG_Z and not uneven_material
        cycle = (f", successors cycle in a fixed order {pct(determinism)} of the time"
                 if determinism >= 0.8 else "")
        return verdict("round-robin", "high" if strong else "medium",
                       f"Round-robin-like: {n} workers each took {took} "
                       f"(Jain {fair['jain']:.3f}) of {total} accepts{live_note}; the same worker accepts "
                       f"twice in a row {pct(self_rate)} of the time ({pct(q)} if independent){cycle} - "
                       f"{why('round-robin', cause)}.")
    notes = []
    if p_even < ALPHA:
        notes.append(f"shares are slightly uneven (chi-square p={p_even:.2g}, max {max_ratio:.2f}x fair)")
    if z >= Z_CRIT:
        notes.append(f"slightly sticky (z={z:.1f})")
    elif z <= -Z_CRIT:
        notes.append(f"leans round-robin (z={z:.1f})")
    if notes:
        conf = "low"
    elif p_even >= 0.01 and abs(z) < 2.0:
        conf = "high"
    else:
        conf = "medium"
    extra = f"; {', '.join(notes)}" if notes else ""
    # Only claim independence where the sequence does not contradict it (a significant lean that is not
    # material enough for round-robin or concentrated is said as what it is).
    if z <= -Z_CRIT:
        nxt = "the same worker accepts twice in a row less often than if independent"
    elif z >= Z_CRIT:
        nxt = "the same worker accepts twice in a row more often than if independent"
    else:
        nxt = "the next acceptor is independent of the last"
    return verdict("random", conf,
                   f"Random-like: {n} workers took {took} of {total} accepts "
                   f"(chi-square p={p_even:.2g}){live_note} and {nxt} "
                   f"(same worker {pct(self_rate)}, {pct(q)} expected){extra} - {why('random', cause)}.")


def _concentrated(verdict: Any, figures: dict[str, Any], n: int, over_pid: int, ratio: Mapping[int, float],
                  shares: Mapping[int, float], idle: list[int],
                  seq: tuple[float, float, float] | None, p_uneven: float | None, cause: str, *,
                  turns: tuple[float, float] | None = None, live_note: str = "") -> Verdict:
    """Uneven shares (p_uneven given) and/or sticky successions (seq given); the sentence leads with
    the strongest visible cause: a worker well above its fair share, else idle workers."""
    parts = []
    r = ratio.get(over_pid, 0.0)
    over = r >= 1 + MATERIAL_SHARE
    if p_uneven is not None:
        if over:
            part = f"{_name(over_pid)} takes {pct(shares[over_pid])} - {r:.1f}x its fair share{live_note}"
            if idle:
                part += f", {len(idle)} of {n} workers got nothing"
        else:
            got = "nothing" if idle else "too little"
            part = f"{len(idle) or 'some'} of {n} workers got {got}{live_note}"
        parts.append(part)
    if seq is not None:
        text = (f"consecutive accepts stay on the same worker {pct(seq[0])} of the time "
                f"({pct(seq[1])} expected if independent)")
        if p_uneven is None:
            text += ", although the overall shares are close to even"
        parts.append(text)
    if turns is not None:
        parts.append(f"the same worker accepts twice in a row only {pct(turns[0])} of the time "
                     f"({pct(turns[1])} if independent), so the busy workers take turns")
    if seq is None and not over and cause not in ("reuseport-hash", "accept-mutex"):
        who = "that worker is" if len(idle) == 1 else "those workers are"
        reason = f"check whether {who} stuck, busy, or not accepting on this socket"
    else:
        reason = why("concentrated", cause, taking_turns=turns is not None)
    strong = (p_uneven is not None and p_uneven < STRONG_P) or (seq is not None and seq[2] >= STRONG_Z)
    return verdict("concentrated", "high" if strong else "medium",
                   f"Concentrated: {'; '.join(parts)}; {reason}.")
