"""Fairness figures, the chi-square tail, and the accept-sequence classifier."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter

import pytest

from accept_watch.daemon import analysis
from accept_watch.daemon.analysis import (
    analyze,
    chi2_sf,
    chi_square_even,
    classify,
    coefficient_of_variation,
    fairness,
    gini,
    jain_index,
    max_mean_ratio,
    min_accepts,
    regularized_gamma_q,
)
from accept_watch.daemon.waitmode import WaitMode

MASTER = 100
PIDS = list(range(101, 109))  # 8 workers

# --------------------------------------------------------------------------------------------- helpers


def make_doc(
    seq: list[int],
    *,
    pids: list[int] | None = None,
    port: int = 8000,
    first_from_zero: bool = True,
    mode: str = "shared",
) -> dict:
    """A snapshot document whose counters and transitions come from one accept sequence."""
    pids = sorted(set(seq)) if pids is None else pids
    counts = Counter(seq)
    trans = Counter(itertools.pairwise(seq))
    if first_from_zero and seq:
        trans[(0, seq[0])] += 1
    total = len(seq)
    workers = [{"pid": MASTER, "ppid": 1, "role": "master", "accepts": 0, "share": 0.0, "alive": True}]
    workers += [
        {
            "pid": p,
            "ppid": MASTER,
            "role": "worker",
            "accepts": counts[p],
            "share": counts[p] / total if total else 0.0,
            "alive": True,
        }
        for p in pids
    ]
    return {
        "schema": "accept-watch/1",
        "total_accepts": total,
        "unattributed": 0,
        "diagnostics": {"transitions_map_full": 0},
        "listeners": [
            {
                "address": "127.0.0.1",
                "port": port,
                "family": "ipv4",
                "inode": 4242,
                "mode": mode,
                "pids": [MASTER, *pids],
                "accepts": total,
                "queue_depth": {"current": 0, "max": 3, "limit": 128},
            }
        ],
        "workers": workers,
        "rate_history": [],
        "transitions": [
            {"port": port, "from": a, "to": b, "count": c} for (a, b), c in sorted(trans.items())
        ],
    }


def round_robin(n_accepts: int, pids: list[int] = PIDS) -> list[int]:
    return [pids[i % len(pids)] for i in range(n_accepts)]


def bursts(n_accepts: int, seed: int, pids: list[int] = PIDS) -> list[int]:
    """The same worker takes runs of 3-12 accepts in a row (whoever accepted last goes again)."""
    rng = random.Random(seed)
    seq: list[int] = []
    while len(seq) < n_accepts:
        seq.extend([rng.choice(pids)] * rng.randint(3, 12))
    return seq[:n_accepts]


def port_verdict(doc: dict, **kw) -> dict:
    result = analyze(doc, **kw)
    json.dumps(result, allow_nan=False)  # must stay strict JSON
    return result["per_port"]["8000"]


# --------------------------------------------------------------------------------------------- chi-square


@pytest.mark.parametrize(
    ("x", "df", "expected", "tol"),
    [
        (3.84, 1, 0.05004352124870519, 1e-9),  # the textbook 5 % critical value, df = 1
        (18.307, 10, 0.05000058909139812, 1e-9),  # 5 % critical value, df = 10
        (0.5, 3, 0.9188914116546758, 1e-9),
        (100.0, 80, 0.064570368921133, 1e-9),
        (30.0, 4, 4.894437128029217e-06, 1e-9),
        (200.0, 8, 6.389887702238276e-39, 1e-9),  # deep tail: relative accuracy still holds
        (1000.0, 999, 0.48513148927490146, 1e-9),  # many workers
        (12345.6, 12000, 0.013412044092198146, 1e-8),
    ],
)
def test_chi2_sf_matches_reference_values(x: float, df: int, expected: float, tol: float) -> None:
    # Reference values from scipy.stats.chi2.sf (scipy 1.17).
    assert chi2_sf(x, df) == pytest.approx(expected, rel=tol)


@pytest.mark.parametrize("x", [0.01, 0.7, 2.0, 5.5, 13.0, 40.0, 300.0])
def test_chi2_sf_closed_forms(x: float) -> None:
    # df = 1: erfc(sqrt(x/2)); df = 2: exp(-x/2); df = 4: exp(-x/2) (1 + x/2).
    assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-10, abs=1e-300)
    assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10, abs=1e-300)
    assert chi2_sf(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-10, abs=1e-300)


def test_chi2_sf_at_zero_is_one_and_decreases() -> None:
    for df in (1, 2, 7, 50):
        assert chi2_sf(0.0, df) == 1.0
        values = [chi2_sf(x, df) for x in (0.1, 1, 5, 10, 50, 100)]
        # Non-increasing (the first values round to exactly 1.0 for large df), and really falling.
        assert all(a >= b for a, b in itertools.pairwise(values))
        assert values[-1] < values[0]


def test_gamma_q_is_continuous_where_the_method_switches() -> None:
    # Series below x = a + 1, continued fraction above: both sides must agree.
    for a in (0.5, 3.0, 40.0, 1000.0):
        below = regularized_gamma_q(a, a + 1 - 1e-9)
        above = regularized_gamma_q(a, a + 1 + 1e-9)
        assert below == pytest.approx(above, rel=1e-7)


def test_gamma_q_reference_values() -> None:
    # scipy.special.gammaincc
    assert regularized_gamma_q(0.5, 0.1) == pytest.approx(0.6547208460185768, rel=1e-10)
    assert regularized_gamma_q(10, 12) == pytest.approx(0.24239216167051245, rel=1e-10)
    assert regularized_gamma_q(0.1, 5) == pytest.approx(0.00014393896584673387, rel=1e-9)


@pytest.mark.parametrize(("x", "df"), [(-1.0, 3), (1.0, 0), (1.0, -2), (float("nan"), 3)])
def test_chi2_sf_rejects_bad_input(x: float, df: float) -> None:
    with pytest.raises(ValueError, match="chi2_sf"):
        chi2_sf(x, df)


# --------------------------------------------------------------------------------------------- fairness


def test_equal_split_is_perfectly_fair() -> None:
    f = fairness([125] * 8)
    assert f["jain"] == pytest.approx(1.0)
    assert f["cv"] == pytest.approx(0.0)
    assert f["gini"] == pytest.approx(0.0)
    assert f["max_mean_ratio"] == pytest.approx(1.0)
    assert f["chi2"] == pytest.approx(0.0)
    assert f["chi2_p"] == pytest.approx(1.0)
    assert f["chi2_df"] == 7


@pytest.mark.parametrize("n", [2, 4, 8, 32])
def test_one_worker_takes_all(n: int) -> None:
    counts = [0] * (n - 1) + [1000]
    assert jain_index(counts) == pytest.approx(1 / n)
    assert gini(counts) == pytest.approx((n - 1) / n)
    assert max_mean_ratio(counts) == pytest.approx(n)
    stat, df, p = chi_square_even(counts)
    assert df == n - 1
    assert stat == pytest.approx(1000 * (n - 1))  # sum (x - E)^2 / E with E = 1000/n
    assert p < 1e-100


def test_metrics_agree_with_their_definitions() -> None:
    rng = random.Random(7)
    counts = [rng.randint(0, 500) for _ in range(13)]
    n, mean = len(counts), sum(counts) / len(counts)
    # Gini as the mean absolute difference over twice the mean.
    brute_gini = sum(abs(a - b) for a in counts for b in counts) / (2 * n * n * mean)
    assert gini(counts) == pytest.approx(brute_gini)
    # Jain = 1 / (1 + CV^2) for the population CV.
    cv = coefficient_of_variation(counts)
    assert jain_index(counts) == pytest.approx(1 / (1 + cv * cv))
    stat = sum((c - mean) ** 2 / mean for c in counts)
    assert chi_square_even(counts)[0] == pytest.approx(stat)


def test_zero_accepts_are_undefined_not_perfect() -> None:
    f = fairness([0, 0, 0])
    assert f["jain"] is None and f["gini"] is None and f["chi2_p"] is None
    assert f["workers"] == 3


@pytest.mark.parametrize("bad", [[], [1, -1], [1, float("inf")], [1, "3"]])
def test_fairness_rejects_bad_vectors(bad: list) -> None:
    with pytest.raises(ValueError, match="fairness"):
        fairness(bad)


# --------------------------------------------------------------------------------------------- patterns


def test_strict_round_robin() -> None:
    v = port_verdict(make_doc(round_robin(800)))
    assert v["pattern"] == "round-robin"
    assert v["confidence"] == "high"
    assert v["figures"]["self_rate"] == 0.0
    assert v["figures"]["successor_determinism"] == pytest.approx(1.0)
    assert v["sentence"].startswith("Round-robin-like: 8 workers each took 12.5 % (Jain 1.000)")


def test_bursts_of_the_same_worker_are_concentrated() -> None:
    seq = bursts(4000, seed=3)
    v = port_verdict(make_doc(seq))
    assert v["pattern"] == "concentrated"
    assert v["figures"]["self_rate"] > 0.8
    assert v["figures"]["self_z"] > analysis.STRONG_Z
    assert "stay on the same worker" in v["sentence"]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_uniform_random_sequence(seed: int) -> None:
    rng = random.Random(seed)
    seq = [rng.choice(PIDS) for _ in range(5000)]
    v = port_verdict(make_doc(seq))
    assert v["pattern"] == "random", v["sentence"]
    assert v["figures"]["self_expected"] == pytest.approx(1 / 8, rel=0.02)
    assert abs(v["figures"]["self_z"]) < analysis.Z_CRIT


def test_uneven_but_independent_draws_are_concentrated_by_shares() -> None:
    rng = random.Random(11)
    seq = rng.choices(PIDS, weights=[3, 1, 1, 1, 1, 1, 1, 1], k=5000)
    v = port_verdict(make_doc(seq))
    assert v["pattern"] == "concentrated"
    assert v["figures"]["top_pid"] == PIDS[0]
    # Independent draws: self-transitions match sum(p^2), so the cause named is the share, not stickiness.
    assert v["figures"]["self_ratio"] == pytest.approx(1.0, abs=0.15)
    assert f"worker {PIDS[0]} takes" in v["sentence"] and "x its fair share" in v["sentence"]
    assert "stay on the same worker" not in v["sentence"]


def test_single_acceptor() -> None:
    seq = [PIDS[0]] * 995 + PIDS[1:6]
    v = port_verdict(make_doc(seq, pids=PIDS))
    assert v["pattern"] == "single-acceptor"
    assert str(PIDS[0]) in v["sentence"]


def test_only_one_worker_holds_the_socket() -> None:
    v = port_verdict(make_doc([PIDS[0]] * 60))
    assert v["pattern"] == "single-acceptor"
    assert v["figures"]["workers"] == 1


def test_not_enough_data() -> None:
    v = port_verdict(make_doc(round_robin(20)))
    assert v["pattern"] == "not enough data"
    assert "20 accepts" in v["sentence"]


def test_data_threshold_boundary() -> None:
    need = min_accepts(8)
    assert need == 80  # 10 per worker beats the 50 minimum for 8 workers
    assert min_accepts(2) == 50
    # make_doc records the first accept as a (0 -> pid) transition, so counts equal the sequence length.
    assert port_verdict(make_doc(round_robin(need - 1)))["pattern"] == "not enough data"
    assert port_verdict(make_doc(round_robin(need)))["pattern"] == "round-robin"


def test_first_accept_without_a_zero_predecessor() -> None:
    v = port_verdict(make_doc(round_robin(800), first_from_zero=False))
    assert v["pattern"] == "round-robin"
    assert v["figures"]["accepts"] == 799  # shares come from the transitions' successors


def test_idle_worker_counts_in_the_vector() -> None:
    # 8 workers hold the socket, only 7 ever accept, in strict rotation.
    doc = make_doc(round_robin(700, PIDS[:7]), pids=PIDS)
    result = analyze(doc)
    v = result["per_port"]["8000"]
    assert v["figures"]["workers"] == 8
    assert v["pattern"] == "concentrated"
    assert "1 of 8 workers got nothing" in v["sentence"]
    assert result["fairness"]["workers"] == 8  # the master (0 accepts) is not a competitor
    assert result["fairness"]["jain"] == pytest.approx(7 / 8)
    assert any(f["code"] == "idle_workers" for f in result["flags"])


def test_significant_but_immaterial_unevenness_is_random_with_low_confidence() -> None:
    # Expected transition counts of independent draws with shares 13.5 % / 11.5 %: with 200 000 accepts
    # the chi-square rejects evenness, but no worker is 25 % off its fair share.
    shares = dict(zip(PIDS, [0.135] * 4 + [0.115] * 4, strict=True))
    m = 200_000
    trans = {(a, b): round(m * shares[a] * shares[b]) for a in PIDS for b in PIDS}
    counts = Counter()
    for (_a, b), c in trans.items():
        counts[b] += c
    v = classify(dict(counts), trans)
    assert v.figures["chi2_p"] < analysis.ALPHA
    assert v.pattern == "random"
    assert v.confidence == "low"
    assert "slightly uneven" in v.sentence


def test_no_sequence_data_gives_shares_only_verdicts() -> None:
    even = make_doc(round_robin(800))
    even["transitions"] = []
    v = port_verdict(even)
    assert v["pattern"] == "even"
    assert "cannot be told apart" in v["sentence"]
    uneven = make_doc(random.Random(2).choices(PIDS, weights=[4, 1, 1, 1, 1, 1, 1, 1], k=3000))
    uneven["transitions"] = []
    assert port_verdict(uneven)["pattern"] == "concentrated"


def test_wait_modes_name_the_mechanism() -> None:
    rr = make_doc(round_robin(800))
    modes = {p: WaitMode("blocking-accept", "test") for p in PIDS}
    result = analyze(rr, modes)
    assert "block in accept()" in result["verdict"]["sentence"]
    assert result["wait_modes"]["dominant"] == "blocking-accept"
    assert result["wait_modes"]["by_pid"][str(PIDS[0])] == {"mode": "blocking-accept", "detail": "test"}

    sticky = make_doc(bursts(4000, seed=9))
    modes = {p: {"mode": "epoll-exclusive", "detail": ""} for p in PIDS}
    modes[PIDS[0]] = {"mode": "epoll", "detail": ""}
    result = analyze(sticky, modes)
    assert "EPOLLEXCLUSIVE" in result["verdict"]["sentence"]
    assert any(f["code"] == "wait_mode_mixed" for f in result["flags"])


def test_several_ports_report_the_busiest() -> None:
    doc = make_doc(round_robin(800))
    rng = random.Random(5)
    small = [rng.choice(PIDS) for _ in range(100)]
    doc["transitions"] += [
        {"port": 9000, "from": a, "to": b, "count": c}
        for (a, b), c in Counter(itertools.pairwise(small)).items()
    ]
    result = analyze(doc)
    assert set(result["per_port"]) == {"8000", "9000"}
    assert result["verdict"]["port"] == 8000
    assert result["verdict"]["sentence"].startswith("Port 8000 (busiest of 2): Round-robin-like")


def test_sliding_windows() -> None:
    doc = make_doc(round_robin(800))
    # 50 s where only the first worker accepts, then 10 s of an even split.
    doc["rate_history"] = [[float(t), {str(PIDS[0]): 8}] for t in range(50)]
    doc["rate_history"] += [[float(t), {str(p): 1 for p in PIDS}] for t in range(50, 60)]
    windows = analyze(doc)["fairness"]["windows"]
    assert windows["10s"]["seconds"] == 10
    assert windows["10s"]["jain"] == pytest.approx(1.0)
    assert windows["60s"]["seconds"] == 60
    assert windows["60s"]["accepts"] == 50 * 8 + 10 * 8
    assert windows["60s"]["jain"] < 0.5


def test_no_history_means_no_windows() -> None:
    assert analyze(make_doc(round_robin(800)))["fairness"]["windows"] == {"10s": None, "60s": None}


def test_flags() -> None:
    doc = make_doc(round_robin(800))
    doc["unattributed"] = 3
    doc["diagnostics"]["transitions_map_full"] = 2
    doc["listeners"][0]["queue_depth"] = {"current": 120, "max": 128, "limit": 128}
    doc["workers"][1]["alive"] = False
    codes = {f["code"] for f in analyze(doc)["flags"]}
    assert codes == {"unattributed", "transitions_incomplete", "queue_near_limit", "workers_replaced"}
    assert analyze(make_doc(round_robin(800)))["flags"] == []


def test_empty_document() -> None:
    result = analyze({"workers": [], "listeners": [], "transitions": []})
    assert result["verdict"]["pattern"] == "not enough data"
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("workers"), "no 'workers'"),
        (lambda d: d["transitions"][0].update(count=-1), r"transitions\[0\]\.count must be >= 0"),
        (lambda d: d["transitions"][0].update(to="x"), r"transitions\[0\]\.to must be an integer"),
        (lambda d: d["workers"].append(dict(d["workers"][1])), "appears twice"),
        (lambda d: d.update(rate_history=[[1.0, {"abc": 1}]]), r"rate_history\[0\]"),
        (lambda d: d.update(listeners="nope"), "'listeners' must be a list"),
    ],
)
def test_bad_documents_raise_one_line_errors(mutate, message: str) -> None:
    doc = make_doc(round_robin(100))
    mutate(doc)
    with pytest.raises(ValueError, match=message) as info:
        analyze(doc)
    assert "\n" not in str(info.value)


def test_bad_wait_modes_raise() -> None:
    with pytest.raises(ValueError, match="wait mode of pid"):
        analyze(make_doc(round_robin(100)), {PIDS[0]: "epoll"})


def test_lifo_like_sequence_names_both_causes() -> None:
    # The last acceptor goes again 60 % of the time; otherwise a skewed draw picks the next one.
    rng = random.Random(4)
    seq, last = [], PIDS[0]
    for _ in range(5000):
        last = last if rng.random() < 0.6 else rng.choices(PIDS, weights=[5, 3, 2, 1, 1, 1, 1, 1])[0]
        seq.append(last)
    v = port_verdict(make_doc(seq))
    assert v["pattern"] == "concentrated"
    assert v["confidence"] == "high"
    assert f"worker {PIDS[0]} takes" in v["sentence"]
    assert "stay on the same worker" in v["sentence"]
    assert v["figures"]["self_ratio"] > analysis.STICKY_RATIO


def test_reuseport_imbalance_is_explained_by_hashing() -> None:
    seq = random.Random(11).choices(PIDS, weights=[3, 1, 1, 1, 1, 1, 1, 1], k=5000)
    v = port_verdict(make_doc(seq, mode="reuseport"))
    assert v["pattern"] == "concentrated"
    assert "SO_REUSEPORT" in v["sentence"]


def test_without_listener_data_every_alive_worker_competes() -> None:
    doc = make_doc(round_robin(800, PIDS[:7]), pids=PIDS)
    doc["listeners"] = []
    v = port_verdict(doc)
    assert v["figures"]["workers"] == 8  # the idle eighth worker still counts
    assert "1 of 8 workers got nothing" in v["sentence"]


def test_empty_fairness_has_the_same_keys() -> None:
    empty = analyze({"workers": [], "listeners": [], "transitions": []})["fairness"]
    full = analyze(make_doc(round_robin(800)))["fairness"]
    assert set(empty) == set(full)
    assert empty["jain"] is None


def test_classify_rejects_bad_input() -> None:
    # No worker seen: an answer that says so, not an exception shown to users.
    assert classify({}, None).pattern == "not enough data"
    with pytest.raises(ValueError, match="accepts of pid 5"):
        classify({5: -1}, None)
    with pytest.raises(ValueError, match="transition"):
        classify({5: 60}, {(5, 5): -2})


def test_inflight_flag_names_the_worker_that_accepts_while_busy() -> None:
    from accept_watch.daemon.analysis import _inflight_flags

    calm = {"pid": 1, "inflight": {"max": 1, "busy_accepts": 0}}
    keepalive = {"pid": 2, "inflight": {"max": 2, "busy_accepts": 2}}
    # Many in flight, but every request read at once (threads, children, an event loop): not waiting.
    parallel = {"pid": 5, "inflight": {"max": 40, "busy_accepts": 400, "blocked_samples": 0}}
    once = {"pid": 6, "inflight": {"max": 4, "busy_accepts": 40, "blocked_samples": 1, "blocked_max": 4}}
    assert _inflight_flags([calm, keepalive, parallel, once]) == []
    busy = {"pid": 3, "inflight": {"max": 9, "busy_accepts": 40, "blocked_samples": 3, "blocked_max": 6}}
    (flag,) = _inflight_flags([calm, keepalive, parallel, busy])
    assert flag["code"] == "inflight_queueing"
    assert "worker 3 was seen blocked" in flag["message"] and "up to 6" in flag["message"]
    assert "accepted 40" in flag["message"]
    assert _inflight_flags([{"pid": 4}]) == []  # exports without in-flight data
