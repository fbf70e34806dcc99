"""terminal.render / summary_line on hand-built documents (pure strings)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from accept_watch.daemon import fmt, terminal

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def worker(pid: int, accepts: int, total: int, alive: bool = True, role: str = "worker",
           p50: float | None = None, p99: float | None = None) -> dict[str, Any]:
    return {
        "pid": pid, "ppid": 1, "cmdline": f"w{pid}", "role": role, "accepts": accepts,
        "share": accepts / total if total else 0.0, "alive": alive, "first_seen": None, "last_seen": None,
        "rate": {"1s": 0.0, "10s": 0.0, "60s": 0.0},
        "queue_wait_us": {"p50": p50, "p99": p99, "max": None, "mean": None, "count": 0},
        "queue_wait_hist": [],
    }


def doc(accepts: list[int], lost: int = 0, unattributed: int = 0, master: bool = False,
        listeners: list[dict] | None = None, ended: bool = False) -> dict[str, Any]:
    total = sum(accepts)
    workers = [worker(1000 + i, a, total) for i, a in enumerate(accepts)]
    if master:
        workers.insert(0, worker(999, 0, total, role="master"))
    if listeners is None:
        listeners = [{
            "address": "127.0.0.1", "port": 8000, "family": "ipv4", "inode": 1, "mode": "shared",
            "pids": [w["pid"] for w in workers], "accepts": total, "open": True,
            "queue_depth": {"current": 2, "max": 7, "limit": 128}, "depth_history": [],
        }]
    return {
        "schema": "accept-watch/1", "master_pid": 999, "master_cmdline": "gunicorn -w 4 app:app",
        "probe": "fexit", "duration_s": 75.5, "total_accepts": total, "lost_events": lost,
        "unattributed": unattributed, "listeners": listeners, "workers": workers,
        "ended_at": "2026-01-01T00:00:00+00:00" if ended else None,
    }


def rows(text: str) -> dict[int, str]:
    """Worker rows by pid."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s+(\d+)\s+[\d,]+\s+[\d.]+%", line)
        if m:
            out[int(m.group(1))] = line
    return out


def bar_of(line: str) -> str:
    return line.split()[-1]


# ---------------------------------------------------------------------------------------------------
def test_header_and_listener() -> None:
    out = terminal.render(doc([60, 20, 20], master=True))
    head = out.splitlines()[0]
    for part in ("accept-watch", "total 100", "lost 0", "unattributed 0", "pid 999", "probe fexit",
                 "elapsed 1m15s"):
        assert part in head, (part, head)
    listener = out.splitlines()[1]
    assert "127.0.0.1:8000" in listener and "shared" in listener and "queue 2/128" in listener
    assert "max 7" in listener and "(4 pids)" in listener
    assert "\x1b" not in out


def test_losses_are_loud_even_when_cut() -> None:
    out = terminal.render(doc([5, 5], lost=3, unattributed=1234), width=40)
    head = out.splitlines()[0]
    assert "LOST 3!" in head
    out = terminal.render(doc([5, 5], unattributed=1234), width=60)
    assert "UNATTRIBUTED 1,234!" in out.splitlines()[0]
    colored = terminal.render(doc([5, 5], lost=3), ansi=True)
    assert "\x1b[1;97;41mLOST 3!\x1b[0m" in colored


def test_ipv6_listener_and_near_limit() -> None:
    lst = [{"address": "::", "port": 9000, "family": "ipv6", "inode": 2, "mode": "reuseport", "pids": [1000],
            "accepts": 0, "open": False, "queue_depth": {"current": None, "max": 120, "limit": 128},
            "depth_history": []}]
    out = terminal.render(doc([1], listeners=lst), ansi=True)
    line = ANSI.sub("", out.splitlines()[1])
    assert "[::]:9000 (closed) reuseport (1 pid)" in line and "queue -/128" in line
    assert "\x1b[1;97;41m max 120" in out.splitlines()[1]


@pytest.mark.parametrize("width", [40, 60, 77, 78, 100, 160])
def test_no_line_exceeds_the_width(width: int) -> None:
    d = doc([12345678, 5, 0, 999], lost=1, master=True)
    for ansi in (False, True):
        for line in terminal.render(d, width=width, ansi=ansi).splitlines():
            assert len(ANSI.sub("", line)) <= width, line


def test_bars_scale_to_max_share_with_fair_marker() -> None:
    d = doc([40, 20, 20, 20])
    d["workers"][0]["rate"] = {"1s": 12.0, "10s": 9.5, "60s": 0.0}
    d["workers"][0]["queue_wait_us"].update(p50=60.1, p99=2500.0)
    out = terminal.render(d, width=100)
    r = rows(out)
    bars = {pid: bar_of(line) for pid, line in r.items()}
    width = len(bars[1000])
    assert width == 100 - terminal.FULL_WIDTH + terminal.MIN_BAR
    assert {len(b) for b in bars.values()} == {width}
    marker = int(0.25 / 0.40 * width)  # fair share 1/4 on a scale whose end is the top share (40 %)
    for b in bars.values():
        assert b.index("|") == marker and b.count("|") == 1
    assert bars[1000].replace("|", "#") == "#" * width
    half = round(0.5 * width)  # 20 % of a 40 % scale
    assert bars[1001][:half] == "#" * half and set(bars[1001][half:]) == {".", "|"}
    assert "12.0/9.5" in r[1000] and "60us" in r[1000] and "2.5ms" in r[1000] and "alive" in r[1000]
    assert "40.0%" in r[1000] and "20.0%" in r[1001]


def test_no_accepts_yet() -> None:
    out = terminal.render(doc([0, 0, 0], master=True))
    r = rows(out)
    assert set(r) == {999, 1000, 1001, 1002}
    for line in r.values():
        assert set(bar_of(line)) == {"."} and "0.0%" in line
    assert "master" in r[999]
    assert "fair 33.3%" in out  # 3 workers compete; the idle master does not


def test_no_workers_at_all() -> None:
    out = terminal.render(doc([]))
    assert "(no workers)" in out


def test_many_workers_are_truncated() -> None:
    accepts = [(i * 37) % 101 for i in range(256)]
    d = doc(accepts)
    out = terminal.render(d, max_workers=32)
    r = rows(out)
    assert len(r) == 32
    busiest = sorted(d["workers"], key=lambda w: (-w["accepts"], w["pid"]))[:32]
    assert set(r) == {w["pid"] for w in busiest}
    assert list(r) == sorted(r)  # shown in pid order
    rest = sum(accepts) - sum(w["accepts"] for w in busiest)
    assert out.splitlines()[-1].strip() == f"... 224 more workers ({rest:,} accepts)"


def test_exited_worker_and_ended_run() -> None:
    d = doc([3, 4], ended=True)
    d["workers"][1]["alive"] = False
    out = terminal.render(d)
    assert "exited" in rows(out)[1001] and "alive" in rows(out)[1000]
    assert "ran 1m15s" in out.splitlines()[0] and "[ended]" in out.splitlines()[0]


def test_summary_line() -> None:
    line = terminal.summary_line(doc([60, 20, 20], lost=2, master=True))
    assert line == ("accept-watch: 100 accepts by 3 workers in 1m15s; busiest pid 1000 60.0% (fair 33.3%); "
                    "LOST 2!; unattributed 0")
    empty = "accept-watch: 0 accepts by 0 workers in 1m15s; lost 0; unattributed 0"
    assert terminal.summary_line(doc([])) == empty


def test_formatters() -> None:
    assert [fmt.fmt_us(v) for v in (None, 0.4, 999.4, 1500.0, 2_500_000.0)] == [
        "-", "0us", "999us", "1.5ms", "2.50s"]
    assert [fmt.fmt_duration(v) for v in (None, 9.25, 61, 3725)] == ["-", "9.2s", "1m01s", "1h02m05s"]


def test_renders_an_aggregator_document() -> None:
    """End to end with the real producer of the document."""
    from accept_watch.daemon.discovery import Listener, ProcessInfo, Topology
    from accept_watch.daemon.stats import Aggregator
    from accept_watch.probes.records import KernelSnapshot, WorkerCounters

    procs = {1: ProcessInfo(1, 0, "m", 1.0, "master"), 2: ProcessInfo(2, 1, "w", 1.0, "worker"),
             3: ProcessInfo(3, 1, "w", 1.0, "worker")}
    topo = Topology(1, "m", procs, [Listener(9, "ipv4", "0.0.0.0", 80, [1, 2, 3], "shared")])
    agg = Aggregator(topo, "tracepoint", "", "k", mono_clock=lambda: 0, process_lookup=lambda pid: None)
    snap = KernelSnapshot(10**9, (WorkerCounters(2, 80, 30, 1, 2, 0, 0, 0),
                                  WorkerCounters(3, 80, 10, 1, 2, 0, 0, 0)), {}, (), {}, {})
    agg.update(snap, topo, {9: 4})
    out = terminal.render(agg.document())
    r = rows(out)
    assert "75.0%" in r[2] and "25.0%" in r[3] and "30.0/30.0" in r[2]
    assert "0.0.0.0:80" in out and "queue 4/-" in out


def test_incomplete_figures_are_named() -> None:
    """A full map other than the worker counters' (e.g. more listeners than the listener map holds)
    is said under the table; zero counters and unknown names are not."""
    d = doc([5, 5])
    d["diagnostics"] = {"listeners_map_full": 104, "hist_map_full": 0, "made_up\x1b[2J": 3}
    text = terminal.render(d, width=120, ansi=False)
    assert "! listeners_map_full 104: accepts missing from per-listener figures" in text
    assert "hist_map_full" not in text and "made_up" not in text
