"""Fair shares over the workers live at each moment (daemon/fairshare.py) and the verdicts built on
them: replacing workers alone must never read as concentration; real concentration among the live
workers must still be found."""

from __future__ import annotations

import random

import pytest
from accept_watch.daemon.analysis import classify
from accept_watch.daemon.fairshare import PortShares, ShareTracker, self_baseline

PORT = 8000


def churn_run(choose, *, workers: int = 4, per_worker: int = 50, generations: int = 12, seed: int = 7):
    """Accepts drawn by choose(live, prev, rng) among `workers` live workers; each worker is replaced
    after `per_worker` accepts (gunicorn --max-requests). One tracker update per 10 accepts.
    Returns (tracker, counts, transitions)."""
    rng = random.Random(seed)
    next_pid = 100
    live = []
    served: dict[int, int] = {}
    for _ in range(workers):
        live.append(next_pid)
        next_pid += 1
    tracker = ShareTracker(0)
    cum: dict[tuple[int, int], int] = {}
    trans: dict[tuple[int, int, int], int] = {}
    prev = 0
    t = 0
    total = 0
    retired = 0
    while retired < generations * workers:
        for _ in range(10):
            pid = choose(live, prev, rng)
            cum[(pid, PORT)] = cum.get((pid, PORT), 0) + 1
            trans[(PORT, prev, pid)] = trans.get((PORT, prev, pid), 0) + 1
            served[pid] = served.get(pid, 0) + 1
            prev = pid
            total += 1
        t += 1_000_000_000
        alive_now = list(live)
        tracker.update(cum, trans, {PORT: live}, alive_now, t)
        for pid in list(live):
            if served.get(pid, 0) >= per_worker:
                live.remove(pid)
                live.append(next_pid)
                next_pid += 1
                retired += 1
    counts = {pid: c for (pid, _), c in cum.items()}
    pairs = {(a, b): c for (_, a, b), c in trans.items()}
    return tracker, counts, pairs


def verdict_of(tracker: ShareTracker, counts, pairs):
    ps = tracker.ports[PORT]
    epochs = [([p for p, _ in k], m, [f for _, f in k]) for k, m in ps.epochs.items()]
    q = self_baseline(counts, ps.expected, epochs, ps.folded_transitions, ps.folded_q)
    live = ps.to_doc()["live_workers"]
    return classify(counts, pairs, expected=ps.expected, self_expected=q, live_workers=live,
                    listener_mode="shared", wait_modes={p: "poll/select" for p in counts})


def test_replacement_alone_is_not_concentration() -> None:
    tracker, counts, pairs = churn_run(lambda live, prev, rng: rng.choice(live))
    v = verdict_of(tracker, counts, pairs)
    assert v.pattern == "random", v.sentence
    # Against an even split over every worker ever seen, the same data looks badly skewed.
    naive = classify(counts, pairs)
    assert naive.pattern == "concentrated", naive.sentence
    assert v.figures["self_expected"] == pytest.approx(0.25, abs=0.02)
    assert v.figures["live_workers"]["min"] >= 4


def test_round_robin_under_churn() -> None:
    def rr(live, prev, rng):
        # FIFO: the worker that has waited longest - the next one after the last acceptor.
        return live[(live.index(prev) + 1) % len(live)] if prev in live else live[0]

    tracker, counts, pairs = churn_run(rr)
    assert verdict_of(tracker, counts, pairs).pattern == "round-robin"


def test_sticky_worker_among_live_ones_is_still_found() -> None:
    def lifo(live, prev, rng):
        return prev if prev in live and rng.random() < 0.7 else rng.choice(live)

    tracker, counts, pairs = churn_run(lifo)
    v = verdict_of(tracker, counts, pairs)
    assert v.pattern == "concentrated" and "same worker" in v.sentence, v.sentence


def test_uneven_live_worker_is_named_with_its_ratio() -> None:
    heavy = {}

    def uneven(live, prev, rng):
        heavy.setdefault("pid", live[0])
        return heavy["pid"] if rng.random() < 0.55 else rng.choice(live)

    tracker = ShareTracker(0)
    rng = random.Random(3)
    live = [1, 2, 3, 4]
    cum: dict[tuple[int, int], int] = {}
    trans: dict[tuple[int, int, int], int] = {}
    prev = 0
    for step in range(100):
        for _ in range(10):
            pid = uneven(live, prev, rng)
            cum[(pid, PORT)] = cum.get((pid, PORT), 0) + 1
            trans[(PORT, prev, pid)] = trans.get((PORT, prev, pid), 0) + 1
            prev = pid
        tracker.update(cum, trans, {PORT: live}, live, (step + 1) * 1_000_000_000)
    counts = {pid: c for (pid, _), c in cum.items()}
    pairs = {(a, b): c for (_, a, b), c in trans.items()}
    v = verdict_of(tracker, counts, pairs)
    assert v.pattern == "concentrated"
    assert "worker 1 takes" in v.sentence and "x its fair share" in v.sentence


def test_live_set_needs_both_ends_of_the_interval() -> None:
    ps_tracker = ShareTracker(0)
    ps_tracker.update({(1, PORT): 10, (2, PORT): 10}, {}, {PORT: [1, 2, 3]}, [1, 2, 3], 1_000_000_000)
    # Worker 3 died during the next interval and accepted nothing: owed nothing for it.
    ps_tracker.update({(1, PORT): 20, (2, PORT): 20}, {}, {PORT: [1, 2]}, [1, 2], 2_000_000_000)
    exp = ps_tracker.ports[PORT].expected
    assert exp[1] == pytest.approx(20 / 3 + 10)
    assert exp[3] == pytest.approx(20 / 3)  # owed its share of the first interval only


def test_folding_keeps_totals_and_bounds_epochs() -> None:
    ps = PortShares()
    for i in range(1, 401):
        ps.add_interval({i: 1.0, i + 1: 1.0}, {i: 1, i + 1: 1}, 1, 1.0)
    assert len(ps.epochs) <= 256
    assert ps.folded_transitions + sum(ps.epochs.values()) == 400
    owed_before = sum(ps.expected.values())
    for pid in range(1, 301):
        ps.fold(pid)
    assert sum(ps.observed.values()) == 800 and ps.observed[0] == 599
    assert sum(ps.expected.values()) == pytest.approx(owed_before)
    assert len(ps.expected) == 102  # 301..401 and the folded entry


def test_generations_within_one_interval_count_as_the_workers_live_at_a_time() -> None:
    """max-requests: four old workers serve their last requests, exit, four new ones take over, all
    inside one read interval. Presence from the accept times keeps the live count at four, not eight."""
    t = ShareTracker(0)
    old, new = [1, 2, 3, 4], [5, 6, 7, 8]
    t.update({(p, PORT): 10 for p in old}, {}, {PORT: old}, old, 1_000_000_000)
    accepts = {(p, PORT): 15 for p in old} | {(p, PORT): 5 for p in new}
    spans = {p: (0, 1_500_000_000) for p in old} | {p: (1_500_000_000, 1_990_000_000) for p in new}
    t.update(accepts, {}, {PORT: new}, new, 2_000_000_000, spans)
    doc = t.ports[PORT].to_doc()
    assert doc["live_workers"]["max"] == 4
    exp = t.ports[PORT].expected
    assert exp[1] == pytest.approx(40 / 4 + 40 * 0.5 / 4)  # whole first interval, half the second
    assert self_baseline({p: 1 for p in old + new}, {p: 1.0 for p in old + new},
                         [(old + new, 10, [0.5] * 4 + [0.5] * 4)]) == pytest.approx(0.25)
