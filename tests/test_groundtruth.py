"""Unit tests of tests/groundtruth.py: the judge of the real-server verdict tests must itself be right."""

from __future__ import annotations

import math

import pytest

from tests.groundtruth import (
    LogRecord,
    expected_self_rate,
    fair_expected,
    lifetimes,
    live_counts,
    live_fair_ratios,
    live_summary,
    per_pid,
    per_port,
    self_rate,
    shares,
    spread,
)


def recs(pids: list[int], port: int = 80) -> list[LogRecord]:
    return [LogRecord(pid, float(i), port) for i, pid in enumerate(pids)]


def test_counts_shares_and_ports() -> None:
    rs = [*recs([1, 2, 1, 1]), LogRecord(3, 9.0, 81)]
    assert per_pid(rs) == {1: 3, 2: 1, 3: 1}
    assert per_port(rs) == {80: 4, 81: 1}
    assert shares(rs) == {1: 0.6, 2: 0.2, 3: 0.2}
    assert shares([]) == {}


def test_self_rate_in_log_order() -> None:
    assert self_rate(recs([1, 1, 2, 2, 1])) == pytest.approx(2 / 4)
    assert self_rate(recs([1, 2, 3, 4] * 5)) == 0.0
    assert self_rate(recs([7])) is None


def test_expected_self_rate_with_all_alive_is_one_over_n() -> None:
    rs = recs([1, 2, 3, 4] * 10)
    life = lifetimes(rs)
    assert expected_self_rate(rs, life) == pytest.approx(0.25, abs=0.02)


def test_replacement_alone_is_not_concentration() -> None:
    # 4 workers at a time; each slot's worker is replaced every 20 connections (max-requests style).
    pids, next_pid, slots = [], 100, [1, 2, 3, 4]
    for i in range(200):
        if i and i % 20 == 0:
            slots[(i // 20) % 4] = next_pid
            next_pid += 1
        pids.append(slots[i % 4])
    rs = recs(pids)
    life = lifetimes(rs)
    # Every-worker-ever would say 1/(number of pids); the live view says about 1/4.
    assert len(life) > 8
    assert live_summary(rs, life)["max"] <= 5
    s = spread(rs, min_expected=3)
    assert s.even(), s
    assert s.self_rate == 0.0 and s.self_expected is not None and s.self_expected > 0.15


def test_concentration_is_seen() -> None:
    rs = recs(([1] * 8 + [2, 3, 4]) * 10)
    s = spread(rs)
    assert not s.even() and s.max_fair_ratio > 2
    assert s.self_rate is not None and s.self_expected is not None and s.self_rate > s.self_expected
    assert not s.independent_like()


def test_single_acceptor() -> None:
    s = spread(recs([5] * 300 + [6]))
    assert s.single_acceptor and s.top_share > 0.99


def test_known_lifetimes_widen_and_add_idle_workers() -> None:
    rs = recs([1, 2, 1, 2])
    life = lifetimes(rs, {3: (0.0, 3.0), 1: (-5.0, 0.0)})
    assert life == {1: (-5.0, 2.0), 2: (1.0, 3.0), 3: (0.0, 3.0)}
    exp = fair_expected(rs, life)
    assert sum(exp.values()) == pytest.approx(4)
    assert live_fair_ratios(rs, life)[3] == 0.0
    with pytest.raises(ValueError):
        lifetimes(rs, {9: (2.0, 1.0)})


def test_independent_like_accepts_a_random_sequence() -> None:
    import random

    rng = random.Random(7)
    rs = recs([rng.choice([1, 2, 3, 4]) for _ in range(400)])
    s = spread(rs)
    assert s.independent_like() and s.even(0.35)


def test_always_alive_workers_count_even_when_idle() -> None:
    from tests.groundtruth import always

    rs = recs([1] * 50)
    s = spread(rs, always([1, 2, 3, 4]))
    assert s.workers == 4 and s.single_acceptor and not s.even()
    assert s.self_expected == pytest.approx(0.25) and s.self_rate == 1.0 and s.streaky()
    assert not spread(rs).even(), "one worker alone is not an even spread"


def test_membership_at_start_and_end_bounds_lifetimes() -> None:
    from tests.groundtruth import from_membership

    # 1 and 2 serve throughout; 3 leaves after t=3; 4 arrives at t=4 (its first record).
    rs = recs([1, 3, 2, 3, 1, 4, 2, 4, 1])
    life = lifetimes(rs, from_membership([1, 2, 3], [1, 2, 4]))
    assert life[1] == (-math.inf, math.inf) and life[2] == (-math.inf, math.inf)
    assert life[3] == (-math.inf, 3.0) and life[4] == (5.0, math.inf)
    # At t=4 the leaver is gone and the newcomer not seen yet: a gap of one.
    assert live_counts(rs, life) == [3, 3, 3, 3, 2, 3, 3, 3, 3]
