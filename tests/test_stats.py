"""Aggregator: fake kernel snapshots in, the accept-watch/1 document out (pure logic)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterable, Mapping

import pytest

from accept_watch.daemon.discovery import Listener, ProcessInfo, Topology
from accept_watch.daemon.stats import Aggregator
from accept_watch.probes.histogram import bucket_bounds, bucket_index
from accept_watch.probes.records import (
    AcceptEvent,
    DiagCounter,
    EventSource,
    KernelSnapshot,
    ListenerCounters,
    WorkerCounters,
)

S = 1_000_000_000
START = 5_000 * S  # monotonic ns when the aggregator starts
WALL_OFFSET = 1_790_000_000 * S  # wall = mono + offset
MASTER = 100
PORT = 8000
INODE = 4242


class FakeClock:
    def __init__(self) -> None:
        self.mono = START

    def mono_ns(self) -> int:
        return self.mono

    def wall_ns(self) -> int:
        return self.mono + WALL_OFFSET


def proc(pid: int, role: str = "worker", ctime: float = 1000.0, cmd: str | None = None) -> ProcessInfo:
    return ProcessInfo(pid, MASTER if role == "worker" else 1, cmd or f"{role} {pid}", ctime, role)


def topo(workers: Iterable[int] = (101, 102, 103), listeners: list[Listener] | None = None,
         ctimes: Mapping[int, float] | None = None) -> Topology:
    ws = list(workers)
    procs = {MASTER: proc(MASTER, "master")}
    for w in ws:
        procs[w] = proc(w, ctime=(ctimes or {}).get(w, 1000.0))
    if listeners is None:
        listeners = [Listener(INODE, "ipv4", "127.0.0.1", PORT, sorted([MASTER, *ws]), "shared")]
    return Topology(MASTER, "gunicorn -w 3 app:app", procs, listeners)


def wc(pid: int, accepts: int, port: int = PORT, wait_count: int = 0, wait_sum: int = 0, wait_max: int = 0,
       first: int = START + 1, last: int = START + 2) -> WorkerCounters:
    return WorkerCounters(pid, port, accepts, first, last, wait_count, wait_sum, wait_max)


def snap(t_ns: int, workers: Iterable[WorkerCounters] = (), hist: dict | None = None,
         listeners: Iterable[ListenerCounters] = (), transitions: dict | None = None,
         diag: dict | None = None) -> KernelSnapshot:
    return KernelSnapshot(t_ns, tuple(workers), hist or {}, tuple(listeners), transitions or {}, diag or {})


def counts_snap(t_ns: int, counts: Mapping[int, int]) -> KernelSnapshot:
    return snap(t_ns, [wc(p, c) for p, c in counts.items()])


def make(topology: Topology | None = None, lookup=None, **kw) -> tuple[Aggregator, FakeClock]:
    clock = FakeClock()
    agg = Aggregator(topology or topo(), "fexit", "fexit on inet_csk_accept", "6.18.0-test",
                     wall_clock=clock.wall_ns, mono_clock=clock.mono_ns,
                     process_lookup=lookup or (lambda pid: None), **kw)
    return agg, clock


def workers_by_pid(doc: dict) -> dict[int, dict]:
    return {w["pid"]: w for w in doc["workers"]}


# ---------------------------------------------------------------------------------------------------
def test_document_before_any_update() -> None:
    agg, _ = make()
    doc = agg.document()
    json.dumps(doc)
    assert doc["schema"] == "accept-watch/1"
    assert doc["master_pid"] == MASTER and doc["master_cmdline"] == "gunicorn -w 3 app:app"
    assert (doc["probe"], doc["probe_detail"]) == ("fexit", "fexit on inet_csk_accept")
    assert doc["kernel"] == "6.18.0-test"
    assert doc["total_accepts"] == 0 and doc["ended_at"] is None
    assert [w["pid"] for w in doc["workers"]] == [MASTER, 101, 102, 103]
    assert all(w["share"] == 0.0 and w["accepts"] == 0 and w["alive"] for w in doc["workers"])
    assert doc["listeners"][0]["queue_depth"] == {"current": None, "max": None, "limit": None}
    assert doc["rate_history"] == [] and doc["transitions"] == [] and doc["analysis"] == {}


def test_totals_shares_and_ports_summed() -> None:
    agg, clock = make()
    clock.mono = START + S
    agg.update(snap(START + S, [wc(101, 30), wc(101, 10, port=8001), wc(102, 60)]), topo(), {})
    doc = agg.document()
    w = workers_by_pid(doc)
    assert doc["total_accepts"] == 100
    assert (w[101]["accepts"], w[102]["accepts"], w[103]["accepts"]) == (40, 60, 0)
    assert (w[101]["share"], w[102]["share"], w[103]["share"]) == (0.4, 0.6, 0.0)
    assert w[MASTER]["role"] == "master" and w[101]["role"] == "worker"
    assert w[101]["ppid"] == MASTER and w[101]["cmdline"] == "worker 101"
    assert doc["duration_s"] == 1.0


def test_times_are_utc_iso_from_monotonic() -> None:
    agg, clock = make()
    clock.mono = START + 3 * S
    agg.update(snap(START + 2 * S, [wc(101, 5, first=START + S // 2, last=START + 2 * S - 1000)]), topo(), {})
    doc = agg.document()
    assert doc["started_at"] == "2026-09-21T15:36:40.000000+00:00"  # date -u -d @1790005000
    assert doc["updated_at"] == "2026-09-21T15:36:42.000000+00:00"
    w = workers_by_pid(doc)[101]
    assert w["first_seen"] == "2026-09-21T15:36:40.500000+00:00"
    assert w["last_seen"] == "2026-09-21T15:36:41.999999+00:00"
    assert workers_by_pid(doc)[102]["first_seen"] is None


def test_rates_over_windows() -> None:
    agg, _ = make()
    total = 0
    for sec in range(1, 71):  # pid 101: 10 accepts/s for 70 s, then nothing
        total += 10
        agg.update(counts_snap(START + sec * S, {101: total, 102: 2 * sec}), topo(), {})
    r = workers_by_pid(agg.document())[101]["rate"]
    assert r == {"1s": 10.0, "10s": 10.0, "60s": 10.0}
    for sec in range(71, 76):
        agg.update(counts_snap(START + sec * S, {101: total, 102: 2 * sec}), topo(), {})
    doc = agg.document()
    r = workers_by_pid(doc)[101]["rate"]
    # window (65, 75]: accepts during 66..70 = 50; window (15, 75]: 16..70 = 550
    assert r == {"1s": 0.0, "10s": 5.0, "60s": round(550 / 60, 3)}
    assert workers_by_pid(doc)[102]["rate"] == {"1s": 2.0, "10s": 2.0, "60s": 2.0}
    assert workers_by_pid(doc)[103]["rate"] == {"1s": 0.0, "10s": 0.0, "60s": 0.0}


def test_rate_windows_shorter_than_the_run_use_the_start() -> None:
    agg, _ = make()
    agg.update(counts_snap(START + 2 * S, {101: 30}), topo(), {})
    r = workers_by_pid(agg.document())[101]["rate"]
    assert r == {"1s": 15.0, "10s": 15.0, "60s": 15.0}  # 30 accepts in the 2 s since start


def test_one_second_rate_tolerates_timer_jitter() -> None:
    agg, _ = make()
    times = [1.0, 2.004, 2.998, 4.003]
    for i, t in enumerate(times, start=1):
        agg.update(counts_snap(START + int(t * S), {101: 7 * i}), topo(), {})
    r = workers_by_pid(agg.document())[101]["rate"]["1s"]
    assert r == round(7 / (4.003 - 2.998), 3)  # the previous sample, not one 2 s back


def test_rate_history_one_entry_per_second_bounded_to_300s() -> None:
    agg, _ = make()
    for sec in range(1, 401):
        agg.update(counts_snap(START + sec * S, {101: sec, 102: 3 * sec if sec > 200 else 0}), topo(), {})
    hist = agg.document()["rate_history"]
    assert hist[-1][0] == 400.0
    assert hist[0][0] > 100.0 and len(hist) == 300
    assert [t for t, _ in hist] == [float(s) for s in range(101, 401)]
    assert hist[0][1] == {"101": 1}
    assert hist[-1][1] == {"101": 1, "102": 3}
    assert hist[100][1] == {"101": 1, "102": 603}  # t=201: pid 102's first delta, 3*201


def test_rate_history_bins_sub_second_updates() -> None:
    agg, _ = make()
    n = 0
    for q in range(1, 21):  # 5 s in 250 ms steps, 2 accepts per step
        n += 2
        agg.update(counts_snap(START + q * S // 4, {101: n}), topo(), {})
    hist = agg.document()["rate_history"]
    assert [t for t, _ in hist] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [c["101"] for _, c in hist] == [8] * 5
    assert sum(c["101"] for _, c in hist) == 40


def test_final_partial_second_is_kept_when_the_run_ends() -> None:
    agg, clock = make()
    agg.update(counts_snap(START + S, {101: 4}), topo(), {})
    agg.update(counts_snap(START + S + S // 2, {101: 7}), topo(), {})  # final read, half a second later
    assert agg.document()["rate_history"] == [[1.0, {"101": 4}]]
    clock.mono = START + 2 * S
    hist = agg.document(ended=True)["rate_history"]
    assert hist == [[1.0, {"101": 4}], [1.5, {"101": 3}]]
    assert agg.document(ended=True)["rate_history"] == hist  # closed once


def test_idle_seconds_appear_as_empty_entries() -> None:
    agg, _ = make()
    for sec in range(1, 4):
        agg.update(counts_snap(START + sec * S, {101: 5}), topo(), {})
    assert agg.document()["rate_history"] == [[1.0, {"101": 5}], [2.0, {}], [3.0, {}]]


def test_exited_worker_keeps_counts() -> None:
    agg, _ = make()
    agg.update(counts_snap(START + S, {101: 5, 102: 7}), topo(), {})
    agg.update(counts_snap(START + 2 * S, {101: 6, 102: 7}), topo([101, 103]), {})
    doc = agg.document()
    w = workers_by_pid(doc)
    assert w[102]["alive"] is False and w[102]["accepts"] == 7
    assert w[101]["alive"] is True
    assert doc["total_accepts"] == 13


def test_undiscovered_acceptor_alive_and_gone() -> None:
    seen: list[int] = []

    def lookup(pid: int) -> ProcessInfo | None:
        seen.append(pid)
        return ProcessInfo(pid, 101, "gunicorn: worker [late]", 2000.0, "worker") if pid == 555 else None

    agg, _ = make(lookup=lookup)
    agg.update(counts_snap(START + S, {101: 1, 555: 4, 666: 2}), topo(), {})
    w = workers_by_pid(agg.document())
    assert (w[555]["cmdline"], w[555]["ppid"], w[555]["alive"], w[555]["accepts"]) == (
        "gunicorn: worker [late]", 101, True, 4)
    assert (w[666]["cmdline"], w[666]["ppid"], w[666]["alive"], w[666]["accepts"]) == ("?", None, False, 2)
    assert agg.document()["total_accepts"] == 7
    assert set(seen) == {555, 666}


def test_pid_reuse_splits_the_kernel_counter() -> None:
    agg, _ = make()
    agg.update(counts_snap(START + S, {101: 10, 102: 5}), topo(), {})
    agg.update(counts_snap(START + 2 * S, {101: 10, 102: 5}), topo([101]), {})  # 102 exits
    # A new process gets pid 102 and accepts 3 more on the same kernel counter.
    t3 = topo([101, 102], ctimes={102: 1500.0})
    agg.update(counts_snap(START + 3 * S, {101: 10, 102: 8}), t3, {})
    doc = agg.document()
    w = workers_by_pid(doc)
    assert w[102]["accepts"] == 3 and w[102]["alive"] is True
    assert doc["total_accepts"] == 18
    assert doc["diagnostics"]["evicted_workers"] == 1
    assert doc["diagnostics"]["evicted_accepts"] == 5
    assert doc["rate_history"][-1][1] == {"102": 3}


def test_exited_workers_are_bounded() -> None:
    agg, _ = make(topo([]), max_exited=3)
    counts: dict[int, int] = {}
    for i in range(10):
        pid = 200 + i
        counts[pid] = i + 1
        agg.update(counts_snap(START + (2 * i + 1) * S, counts), topo([pid]), {})
        agg.update(counts_snap(START + (2 * i + 2) * S, counts), topo([]), {})  # and it exits
    doc = agg.document()
    exited = [w["pid"] for w in doc["workers"] if not w["alive"]]
    assert exited == [207, 208, 209]  # the three most recent
    assert doc["total_accepts"] == sum(range(1, 11))
    assert doc["diagnostics"]["evicted_workers"] == 7
    assert doc["diagnostics"]["evicted_accepts"] == sum(range(1, 8))
    # The kernel still reports the evicted pids' counters: they must not come back or be counted twice.
    agg.update(counts_snap(START + 30 * S, counts), topo([]), {})
    doc = agg.document()
    assert [w["pid"] for w in doc["workers"] if not w["alive"]] == [207, 208, 209]
    assert doc["total_accepts"] == sum(range(1, 11))


def test_queue_wait_merges_ports() -> None:
    agg, _ = make()
    fast, slow = 50_000, 5_000_000  # ns
    hist = {
        (101, 8000): {bucket_index(fast): 60},
        (101, 8001): {bucket_index(fast): 40, bucket_index(slow): 2},
    }
    workers = [
        wc(101, 62, port=8000, wait_count=60, wait_sum=60 * fast, wait_max=fast + 10),
        wc(101, 40, port=8001, wait_count=42, wait_sum=40 * fast + 2 * slow, wait_max=slow + 7),
        wc(102, 5),
    ]
    agg.update(snap(START + S, workers, hist), topo(), {})
    w = workers_by_pid(agg.document())
    q = w[101]["queue_wait_us"]
    assert q["count"] == 102
    assert q["p50"] == pytest.approx(50.0, rel=0.04)
    assert q["p99"] == pytest.approx(5000.0, rel=0.04)  # rank ceil(102 * .99) = 101 falls in the slow bucket
    assert q["max"] == (slow + 7) / 1000
    assert q["mean"] == round((100 * fast + 2 * slow) / 102 / 1000, 3)
    lo_f, hi_f = bucket_bounds(bucket_index(fast))
    lo_s, hi_s = bucket_bounds(bucket_index(slow))
    assert w[101]["queue_wait_hist"] == [[lo_f, hi_f, 100], [lo_s, hi_s, 2]]
    assert w[102]["queue_wait_us"] == {"p50": None, "p99": None, "max": None, "mean": None, "count": 0}
    assert w[102]["queue_wait_hist"] == []


def test_listeners_depth_limit_and_history() -> None:
    listeners = [
        Listener(11, "ipv4", "0.0.0.0", PORT, [101], "reuseport"),
        Listener(12, "ipv4", "0.0.0.0", PORT, [102], "reuseport"),
        Listener(13, "ipv6", "::", 9000, [MASTER, 101, 102], "shared"),
    ]
    t = topo([101, 102], listeners=listeners)
    agg, _ = make(t, history_points=5)
    kernel = [ListenerCounters(11, PORT, 70, 12, 128), ListenerCounters(13, 9000, 3, 2, 4096)]
    for sec in range(1, 11):
        agg.update(snap(START + sec * S, listeners=kernel), t, {11: sec % 4, 12: 9 if sec == 3 else 0, 13: 1})
    doc = agg.document()
    by_inode = {lst["inode"]: lst for lst in doc["listeners"]}
    assert [lst["inode"] for lst in doc["listeners"]] == [11, 12, 13]
    l11, l12, l13 = by_inode[11], by_inode[12], by_inode[13]
    assert l11["queue_depth"] == {"current": 2, "max": 12, "limit": 128}  # kernel max 12 > sampled 3
    assert l12["queue_depth"] == {"current": 0, "max": 9, "limit": 128}  # limit from the same port
    assert l13["queue_depth"] == {"current": 1, "max": 2, "limit": 4096}
    assert (l11["accepts"], l12["accepts"], l13["accepts"]) == (70, 0, 3)
    assert l11["depth_history"] == [[6.0, 2], [7.0, 3], [8.0, 0], [9.0, 1], [10.0, 2]]
    assert (l13["family"], l13["address"], l13["port"], l13["mode"], l13["pids"]) == (
        "ipv6", "::", 9000, "shared", [MASTER, 101, 102])
    assert l11["open"] is True


def test_closed_and_kernel_only_listeners() -> None:
    agg, _ = make()
    agg.update(snap(START + S, listeners=[ListenerCounters(INODE, PORT, 4, 1, 64)]), topo(), {INODE: 1})
    kernel = [ListenerCounters(INODE, PORT, 4, 1, 64), ListenerCounters(777, PORT, 2, 0, 64)]
    agg.update(snap(START + 2 * S, listeners=kernel), topo(listeners=[]), {})
    by_inode = {lst["inode"]: lst for lst in agg.document()["listeners"]}
    assert by_inode[INODE]["open"] is False and by_inode[INODE]["accepts"] == 4
    assert by_inode[INODE]["queue_depth"]["current"] is None
    assert by_inode[777]["mode"] == "unknown" and by_inode[777]["accepts"] == 2


def test_transitions_diagnostics_and_losses() -> None:
    agg, _ = make(max_transitions=2)
    trans = {(PORT, 0, 101): 1, (PORT, 101, 102): 5, (PORT, 102, 101): 4, (PORT, 101, 101): 1}
    diag = {DiagCounter.EVENTS_LOST: 3, DiagCounter.STATS_MAP_FULL: 1, DiagCounter.FD_WALK_FAILED: 2}
    agg.update(snap(START + S, [wc(101, 6), wc(102, 5)], transitions=trans, diag=diag), topo(), {})
    doc = agg.document()
    assert doc["transitions"] == [
        {"port": PORT, "from": 101, "to": 102, "count": 5},
        {"port": PORT, "from": 102, "to": 101, "count": 4},
    ]
    assert doc["lost_events"] == 3 and doc["unattributed"] == 3
    d = doc["diagnostics"]
    assert {c.name.lower() for c in DiagCounter} <= set(d)
    assert (d["events_lost"], d["stats_map_full"], d["fd_walk_failed"], d["hist_map_full"]) == (3, 1, 2, 0)
    assert d["transitions_omitted"] == 2


def test_events_bounded_and_serialized() -> None:
    agg, _ = make(max_events=100)
    for i in range(250):
        agg.add_event(AcceptEvent(
            ts_ns=START + i * 1000, pid=101, tid=101, comm="gunicorn", family=socket.AF_INET,
            local_addr="127.0.0.1", local_port=PORT, peer_addr="127.0.0.1", peer_port=40000 + i,
            queue_wait_ns=None if i % 2 else 1234, backlog=0, backlog_limit=128, listener_inode=INODE,
            source=EventSource.FEXIT,
        ))
    assert len(agg.recent_events(1000)) == 100
    last = agg.recent_events(3)
    assert [e["peer_port"] for e in last] == [40247, 40248, 40249]
    e = last[-1]
    json.dumps(e)
    assert (e["family"], e["source"], e["queue_wait_ns"]) == ("ipv4", "fexit", None)
    assert e["ts_ns"] == START + 249_000
    assert e["ts"] == "2026-09-21T15:36:40.000249+00:00"
    assert agg.recent_events(0) == []
    with pytest.raises(ValueError, match="limit must be >= 0"):
        agg.recent_events(-1)


def test_ended_document_freezes_duration() -> None:
    agg, clock = make()
    agg.update(counts_snap(START + S, {101: 1}), topo(), {})
    clock.mono = START + 4 * S
    doc = agg.document(ended=True)
    assert doc["ended_at"] == "2026-09-21T15:36:44.000000+00:00" and doc["duration_s"] == 4.0
    clock.mono = START + 9 * S
    again = agg.document(ended=True)
    assert again["ended_at"] == doc["ended_at"] and again["duration_s"] == 4.0


def test_older_snapshot_is_refused() -> None:
    agg, _ = make()
    agg.update(counts_snap(START + 2 * S, {101: 1}), topo(), {})
    with pytest.raises(ValueError, match="older than the previous"):
        agg.update(counts_snap(START + S, {101: 1}), topo(), {})


def test_analysis_is_added_by_the_caller_not_written_back() -> None:
    """The aggregator's document has an empty analysis; analyzed() returns a new document with one,
    and a failing analysis says why instead of losing the counts."""
    from accept_watch.daemon import analysis

    agg, _ = make()
    agg.update(counts_snap(START + S, {101: 3}), topo(), {})
    doc = agg.model()
    assert doc.to_dict()["analysis"] == {}
    done = analysis.analyzed(doc)
    assert done is not doc and doc.to_dict()["analysis"] == {}
    assert done.to_dict()["analysis"]["fairness"]["accepts"] == 3
    assert done.to_dict()["workers"] == doc.to_dict()["workers"]
    broken = analysis.analyzed(doc, {"x": "not a mode"})
    assert broken.to_dict()["analysis"]["error"].startswith("analysis failed: ValueError")


def test_real_analysis_accepts_the_document() -> None:
    """Contract with daemon/analysis.py: it must be able to read what we produce."""
    from accept_watch.daemon import analysis

    agg, _ = make()
    trans: dict[tuple[int, int, int], int] = {}
    prev = 0
    for sec in range(1, 31):
        counts = {101: 10 * sec, 102: 10 * sec, 103: 10 * sec}
        agg.update(counts_snap(START + sec * S, counts), topo(), {INODE: 0})
        for pid in (101, 102, 103) * 10:
            trans[(PORT, prev, pid)] = trans.get((PORT, prev, pid), 0) + 1
            prev = pid
    agg.update(snap(START + 31 * S, [wc(p, 300) for p in (101, 102, 103)], transitions=trans), topo(), {})
    doc = analysis.analyzed(agg.model()).to_dict()
    # The idle master is not a competitor; the three workers are.
    assert doc["analysis"]["fairness"]["workers"] == 3
    assert doc["analysis"]["fairness"]["accepts"] == 900
    json.dumps(doc)


def test_memory_stays_bounded_over_a_long_run() -> None:
    agg, _ = make(history_points=300)
    for sec in range(1, 2001):
        agg.update(counts_snap(START + sec * S, {101: sec}), topo(), {INODE: sec % 7})
    doc = agg.document()
    assert len(doc["rate_history"]) <= 301
    assert len(doc["listeners"][0]["depth_history"]) == 300
    assert len(agg._rates.samples) <= 63  # rate-window samples: about 60 s worth


def test_document_while_updating_from_another_thread() -> None:
    agg, _ = make()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                doc = agg.document()
                assert doc["total_accepts"] == sum(w["accepts"] for w in doc["workers"])
                json.dumps(doc)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=reader)
    th.start()
    try:
        for sec in range(1, 400):
            pids = [101, 102, 103] if sec % 5 else [101, 104]
            agg.update(counts_snap(START + sec * S, {p: sec for p in pids}), topo(pids), {})
    finally:
        stop.set()
        th.join()
    assert not errors, errors[0]


def test_one_document_per_update() -> None:
    agg, clock = make()
    clock.mono = START + S
    agg.update(snap(START + S, [wc(101, 5)]), topo(), {})
    first = agg.model()
    assert agg.model() is first and agg.document() is first.to_dict()  # terminal, export, dashboard share it
    clock.mono = START + 2 * S
    agg.update(snap(START + 2 * S, [wc(101, 9)]), topo(), {})
    second = agg.document()
    assert second is not first.to_dict() and second["total_accepts"] == 9
    ended = agg.document(ended=True)
    assert ended["ended_at"] is not None
