"""`accept-watch report`: the verdict of analysis.analyze, a terminal summary, one-line errors, and a
self-contained HTML page that renders in headless Chromium.

The exports are written by the daemon's own document builder (stats.Aggregator), fed with simulated
kernel snapshots of a pre-fork server: round-robin (FIFO wake-up), concentrated (LIFO wake-up), hash
spread, idle, with 1 to 256 workers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from accept_watch.daemon import analysis, cli, fmt, report, report_html
from accept_watch.daemon.discovery import Listener, ProcessInfo, Topology
from accept_watch.daemon.stats import Aggregator
from accept_watch.probes.histogram import bucket_bounds, bucket_index, percentile
from accept_watch.probes.records import Counter, KernelSnapshot, ListenerCounters, WorkerCounters

DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = "/usr/bin/chromium"
MASTER = 4000
PORT = 8000
INODE = 77001
S = 1_000_000_000


# ---------------------------------------------------------------------------------------------------
# Simulated server -> real document builder
# ---------------------------------------------------------------------------------------------------


def _next_pid(pattern: str, pids: list[int], last: int | None, i: int, rng: random.Random) -> int:
    if pattern == "fifo":  # workers blocked in accept(): woken in turn
        return pids[i % len(pids)]
    if pattern == "lifo":  # epoll: the worker that just accepted tends to win again
        if last is not None and rng.random() < 0.7:
            return last
        return pids[min(int(rng.expovariate(0.5)), len(pids) - 1)]
    if pattern == "hash":  # SO_REUSEPORT: independent draws
        return rng.choice(pids)
    raise ValueError(pattern)


def simulate(workers: int = 8, pattern: str = "fifo", seconds: int = 40, rate: int = 150, *,
             inflight: bool = True, seed: int = 1, unattributed: int = 0, lost: int = 0,
             wait_modes: dict[int, str] | None = None) -> dict[str, Any]:
    """An export as accept-watch writes it, from a simulated run: the load alternates between light and
    heavy phases every 10 s; queue waits are log-normal (~60 us, slower under heavy load)."""
    rng = random.Random(seed)
    pids = [MASTER + 1 + i for i in range(workers)]
    procs = {MASTER: ProcessInfo(MASTER, 1, "gunicorn: master [app:app]", 1.0, "master")}
    procs |= {p: ProcessInfo(p, MASTER, "gunicorn: worker [app:app]", 1.0, "worker") for p in pids}
    topo = Topology(MASTER, f"gunicorn -w {workers} -b 127.0.0.1:{PORT} app:app", procs,
                    [Listener(INODE, "ipv4", "127.0.0.1", PORT, [MASTER, *pids], "shared")])
    clock = [10 * S]
    agg = Aggregator(topo, "tracepoint", "syscalls:sys_exit_accept4 tracepoints", "6.18.0-test",
                     wall_clock=lambda: 1_790_000_000 * S, mono_clock=lambda: clock[0],
                     process_lookup=lambda pid: None)
    acc = dict.fromkeys(pids, 0)
    first: dict[int, int] = {}
    last_ns: dict[int, int] = {}
    wsum = dict.fromkeys(pids, 0)
    wmax = dict.fromkeys(pids, 0)
    hist: dict[tuple[int, int], dict[int, int]] = {}
    trans: dict[tuple[int, int, int], int] = {}
    imax = dict.fromkeys(pids, 1 if inflight else 0)
    busy = dict.fromkeys(pids, 0)
    depth_max = 0
    prev: int | None = None
    i = 0
    for sec in range(1, seconds + 1):
        heavy = (sec // 10) % 2 == 1
        n = 0 if pattern == "idle" else int(rate * (3 if heavy else 1) * rng.uniform(0.8, 1.2))
        for k in range(n):
            pid = _next_pid(pattern, pids, prev, i, rng)
            now = clock[0] + int(S * (k + 1) / (n + 1))
            wait = int(rng.lognormvariate(math.log(60_000 * (8 if heavy else 1)), 0.9))
            acc[pid] += 1
            first.setdefault(pid, now)
            last_ns[pid] = now
            wsum[pid] += wait
            wmax[pid] = max(wmax[pid], wait)
            b = hist.setdefault((pid, PORT), {})
            b[bucket_index(wait)] = b.get(bucket_index(wait), 0) + 1
            trans[(PORT, prev or 0, pid)] = trans.get((PORT, prev or 0, pid), 0) + 1
            if inflight and heavy and pattern == "lifo" and rng.random() < 0.3:
                busy[pid] += 1
                imax[pid] = max(imax[pid], 2 + int(rng.expovariate(0.3)))
            prev = pid
            i += 1
        depth_max = max(depth_max, int(rng.expovariate(0.2)) if heavy else 1)
        clock[0] += S
        wcs = tuple(
            WorkerCounters(p, PORT, acc[p], first.get(p, 0), last_ns.get(p, 0), acc[p], wsum[p], wmax[p],
                           inflight=1 if inflight and acc[p] else 0, inflight_max=imax[p],
                           busy_accepts=busy[p],
                           closed=max(0, acc[p] - 1) if inflight else 0,
                           life_sum_ns=max(0, acc[p] - 1) * 3_000_000 if inflight else 0,
                           life_max_ns=40_000_000 if inflight and acc[p] else 0)
            for p in pids if acc[p] or first.get(p)
        )
        snap = KernelSnapshot(
            clock[0], wcs, {k: dict(v) for k, v in hist.items()},
            (ListenerCounters(INODE, PORT, sum(acc.values()), depth_max, 2048),),
            dict(trans), {Counter.EVENTS_LOST: lost, Counter.STATS_MAP_FULL: unattributed},
        )
        agg.update(snap, topo, {INODE: rng.randint(0, 3)})
        if inflight and heavy and pattern == "lifo":
            agg.note_blocked({max(busy, key=lambda p: busy[p]): 3})  # what daemon/blocked.py would see
    doc = agg.document(ended=True)
    if not inflight:
        for w in doc["workers"]:
            del w["inflight"]
    stored_modes = {p: {"mode": m, "detail": ""} for p, m in (wait_modes or {}).items()}
    doc["analysis"] = analysis.analyze(doc, stored_modes)  # what the daemon's analysis hook stores
    return doc


def write(tmp_path: Path, doc: Any, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed entry point's code path, in a fresh interpreter (so a traceback would show)."""
    return subprocess.run([sys.executable, "-m", "accept_watch.daemon.cli", "report", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "120"})


def run_inproc(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(["report", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def squash(text: str) -> str:
    return " ".join(text.split())


ROUND_ROBIN = dict(workers=8, pattern="fifo")
CONCENTRATED = dict(workers=8, pattern="lifo")
MANY = dict(workers=256, pattern="hash", rate=400, seconds=30)
IDLE = dict(workers=4, pattern="idle", seconds=5)


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return {
        "round-robin": simulate(**ROUND_ROBIN),
        "concentrated": simulate(**CONCENTRATED),
        "many": simulate(**MANY),
        "single": simulate(workers=1, pattern="hash", seconds=20),
        "idle": simulate(**IDLE),
    }


# ---------------------------------------------------------------------------------------------------
# Verdict, JSON, terminal summary
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "pattern"), [
    ("round-robin", "round-robin"), ("concentrated", "concentrated"), ("many", "random"),
    ("single", "single-acceptor"), ("idle", "not enough data"),
])
def test_the_verdict_is_analysis_analyze_s(tmp_path: Path, docs: dict, name: str, pattern: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    doc = docs[name]
    expected = analysis.analyze(doc)
    assert expected["verdict"]["pattern"] == pattern  # the simulation does what it says
    path = write(tmp_path, doc)
    rc, out, err = run_inproc(capsys, str(path))
    assert rc == 0 and err == ""
    assert squash(expected["verdict"]["sentence"]) in squash(out)
    assert f"verdict: {pattern} ({expected['verdict']['confidence']} confidence)" in out
    rc, out, err = run_inproc(capsys, str(path), "--json")
    assert rc == 0 and err == ""
    assert json.loads(out) == json.loads(json.dumps(expected))


def test_summary_has_header_figures_listeners_and_every_worker(docs: dict) -> None:
    doc = docs["concentrated"]
    result, warning = report.recompute(doc)
    assert warning is None
    text = report.summary(doc, result, width=140, source="run.json")
    fair = result["fairness"]
    assert f"master {MASTER} gunicorn -w 8" in text and "probe tracepoint" in text
    assert f"accepts {doc['total_accepts']:,}" in text
    assert "lost events 0" in text and "unattributed 0" in text
    assert "ran 40.0s  2026-09-21 14:13:20 -> 14:14:00 UTC" in text
    assert text.isascii()  # printable in any locale (the names and the verdict are ASCII here)
    for label, key in (("Jain", "jain"), ("max/mean", "max_mean_ratio"), ("CV", "cv"), ("Gini", "gini")):
        assert f"{label} {fair[key]:.3g}" in text
    assert f"chi-square p {fmt.fmt_p(fair['chi2_p'])} (df 7," in text
    assert f"127.0.0.1:{PORT}  shared  9 pids" in text and "limit 2,048" in text
    lst = doc["listeners"][0]
    assert f"queue max {lst['queue_depth']['max']:,}" in text
    rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\s+(\d+) (?:worker|master) .*$", text, re.M)}
    assert set(rows) == {w["pid"] for w in doc["workers"]}
    for w in doc["workers"]:
        row = rows[w["pid"]]
        assert f" {w['accepts']:,} " in row and f"{w['share'] * 100:.1f}%" in row
        assert f" {w['inflight']['max']} " in row and f" {w['inflight']['busy_accepts']:,} " in row
    # The in-flight flag of analysis.analyze is shown, whole.
    codes = [f["code"] for f in result["flags"]]
    assert "inflight_queueing" in codes
    for f in result["flags"]:
        assert squash(f["message"]) in squash(text)


def test_summary_without_inflight_data_has_no_inflight_columns(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    doc = simulate(workers=3, pattern="fifo", seconds=12, inflight=False)
    assert all("inflight" not in w for w in doc["workers"])
    rc, out, _ = run_inproc(capsys, str(write(tmp_path, doc)), "--html", str(tmp_path / "r.html"))
    assert rc == 0
    assert "in-flight" not in out and "busy" not in out
    page = (tmp_path / "r.html").read_text()
    assert 'data-plot="inflight"' not in page and "no in-flight data" in page


def test_losses_are_loud(tmp_path: Path) -> None:
    doc = simulate(workers=4, pattern="fifo", seconds=10, unattributed=7, lost=3)
    assert (doc["unattributed"], doc["lost_events"]) == (7, 3)
    out = tmp_path / "r.html"
    proc = run_cli(str(write(tmp_path, doc)), "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "UNATTRIBUTED 7!" in proc.stdout and "LOST EVENTS 3!" in proc.stdout
    assert "could not be attributed" in proc.stdout
    page = out.read_text()
    assert "class='loudline'" in page and page.count("class='tile loud'") == 2


def test_a_stored_verdict_that_differs_is_one_warning_line(tmp_path: Path, docs: dict) -> None:
    doc = copy.deepcopy(docs["round-robin"])
    doc["analysis"]["verdict"] = {"pattern": "random", "sentence": "Random: something else entirely."}
    proc = run_cli(str(write(tmp_path, doc)))
    assert proc.returncode == 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "Random: something else entirely." in lines[0]
    # Same verdict stored: silence.
    assert run_cli(str(write(tmp_path, docs["round-robin"], "same.json"))).stderr == ""


def test_stored_wait_modes_are_used_for_the_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    modes = {MASTER + 1 + i: "poll/select" for i in range(8)}
    doc = simulate(**CONCENTRATED, wait_modes=modes)
    expected = analysis.analyze(doc, {p: {"mode": m, "detail": ""} for p, m in modes.items()})
    assert expected["verdict"]["sentence"] != analysis.analyze(doc)["verdict"]["sentence"]
    rc, out, err = run_inproc(capsys, str(write(tmp_path, doc)))
    assert rc == 0 and err == ""  # same verdict as stored: no warning
    assert squash(expected["verdict"]["sentence"]) in squash(out)
    assert "workers wait in: poll/select (8)" in out


def test_reuseport_group_exited_worker_and_a_running_export(tmp_path: Path, docs: dict,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """One socket per worker (SO_REUSEPORT), a worker that has exited, an export still being written."""
    doc = copy.deepcopy(docs["round-robin"])
    shared = doc["listeners"][0]
    doc["listeners"] = [dict(shared, inode=INODE + i, mode="reuseport", pids=[w["pid"]], accepts=w["accepts"])
                        for i, w in enumerate(doc["workers"]) if w["role"] == "worker"]
    gone = doc["workers"][3]
    gone["alive"] = False
    doc["ended_at"] = None
    expected = analysis.analyze(doc)
    out_html = tmp_path / "r.html"
    rc, out, _ = run_inproc(capsys, str(write(tmp_path, doc)), "--html", str(out_html))
    assert rc == 0
    assert squash(expected["verdict"]["sentence"]) in squash(out)
    assert out.count(f"127.0.0.1:{PORT}  reuseport  1 pid  accepts") == 8
    assert re.search(rf"^\s+{gone['pid']} worker .* exited ", out, re.M)
    assert "running for 40.0s" in out and "-> now" not in out and "still running" in out
    page = out_html.read_text()
    check_page(page)
    assert page.count("<td>reuseport</td>") == 8 and "<tr class=gone>" in page
    assert f'fill="{report_html.GREY}"><title>pid {gone["pid"]}:' in page  # the exited worker's bar
    assert "elapsed (still running)" in page


# ---------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, no traceback
# ---------------------------------------------------------------------------------------------------


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("accept-watch report: error: ") and needle in lines[0], lines[0]


@pytest.mark.parametrize(("content", "needle"), [
    (None, "no such file"),
    ("{not json", "not JSON (Expecting property name"),
    ("", "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON (not UTF-8"),
    ("[1, 2]", "a JSON object is expected"),
    ('{"schema": "other/9"}', "schema 'other/9' is not 'accept-watch/1'"),
    ('{"workers": []}', "no 'schema' key"),
    ('{"schema": "accept-watch/1"}', "missing key(s) master_pid, probe, duration_s"),
])
def test_unreadable_input_is_one_line(tmp_path: Path, content: str | bytes | None, needle: str) -> None:
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    _assert_one_line_error(run_cli(str(path)), needle)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


@pytest.mark.parametrize(("mutate", "needle"), [
    *[(_drop(k), f"missing key(s) {k}") for k in report.REQUIRED_KEYS],
    (lambda d: d["workers"][0].pop("accepts"), "workers[0] has no 'accepts'"),
    (lambda d: d["workers"][1].update(accepts="12"), "workers[1].accepts must be a non-negative integer"),
    (lambda d: d["workers"][1].update(share=1.5), "workers[1].share must be a number in [0, 1]"),
    (lambda d: d["workers"][2]["queue_wait_hist"].append([5, 1, 3]), "workers[2].queue_wait_hist["),
    (lambda d: d["workers"][2]["inflight"].pop("busy_accepts"), "workers[2].inflight has no 'busy_accepts'"),
    (lambda d: d["workers"][2].update(inflight=[1]), "workers[2].inflight must be an object"),
    (lambda d: d["listeners"][0].pop("queue_depth"), "listeners[0] has no 'queue_depth'"),
    (lambda d: d["listeners"][0]["queue_depth"].update(max=-1), "listeners[0].queue_depth.max"),
    (lambda d: d.update(workers={}), "workers must be a list"),
    (lambda d: d.update(total_accepts=None), "total_accepts must be a non-negative integer"),
    (lambda d: d["rate_history"].append(["x", {}]), "][0] must be a number, got 'x'"),
    (lambda d: d["transitions"].append({"port": 1}), "has no 'from'"),
    (lambda d: d["workers"].append(copy.deepcopy(d["workers"][1])), "appears twice"),
    (lambda d: d.update(analysis=[]), "analysis must be an object"),
])
def test_malformed_export_is_one_line(tmp_path: Path, docs: dict, mutate: Callable[[dict], None],
                                      needle: str) -> None:
    doc = copy.deepcopy(docs["round-robin"])
    mutate(doc)
    _assert_one_line_error(run_cli(str(write(tmp_path, doc))), needle)


def test_bad_arguments_and_outputs_are_one_line(tmp_path: Path, docs: dict) -> None:
    good = str(write(tmp_path, docs["round-robin"]))
    _assert_one_line_error(run_cli(), "the following arguments are required: FILE.json")
    _assert_one_line_error(run_cli(good, "--frobnicate"), "unrecognized arguments: --frobnicate")
    _assert_one_line_error(run_cli(str(tmp_path)), "is a directory")
    _assert_one_line_error(run_cli(good, "--html", str(tmp_path / "missing" / "r.html")), "does not exist")
    _assert_one_line_error(run_cli(good, "--html", str(tmp_path)), "it is a directory")


def test_html_is_written_atomically(tmp_path: Path, docs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path, docs["round-robin"])
    out = tmp_path / "r.html"
    out.write_text("old report")
    rc, _, err = run_inproc(capsys, str(src), "--html", str(out))
    assert rc == 0 and "HTML report written to" in err
    assert out.read_text().startswith("<!doctype html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "run.json"]  # no temp file left


# ---------------------------------------------------------------------------------------------------
# The HTML page
# ---------------------------------------------------------------------------------------------------

VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col"}


class StrictChecker(HTMLParser):
    """Every non-void element closed in order; <svg> counted by data-plot; any parser complaint kept."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.plots: list[str] = []
        self.titles = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            self.plots.append(dict(attrs).get("data-plot") or "")
        self.titles += tag == "title"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            self.errors.append("self-closed <svg/>")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            self.errors.append(f"end tag for void <{tag}>")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-3:]}")
        else:
            self.stack.pop()


def check_page(page: str) -> StrictChecker:
    checker = StrictChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == [], (checker.errors, checker.stack[-5:])
    # Self-contained: no URL of any kind (the SVG namespace is the one the brief tolerates), no script,
    # nothing fetched.
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    for needle in ("<script", " src=", " href=", "url(", "@import", "<link", "<iframe"):
        assert needle not in page.lower(), needle
    return checker


@pytest.mark.parametrize("name", ["round-robin", "concentrated", "many", "single", "idle"])
def test_html_is_self_contained_and_well_formed(tmp_path: Path, docs: dict, name: str) -> None:
    doc = docs[name]
    out = tmp_path / "r.html"
    proc = run_cli(str(write(tmp_path, doc)), "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text(encoding="utf-8")
    checker = check_page(page)
    assert [p for p in checker.plots if p] == ["share", "rate", "wait-hist", "wait-workers", "inflight"]
    expected = analysis.analyze(doc)
    assert report_html._e(expected["verdict"]["sentence"]) in page
    for flag in expected["flags"]:  # each shown once (a flag repeating the verdict only as the verdict)
        assert page.count(report_html._e(flag["message"])) == 1
    for w in doc["workers"]:  # every worker in the table, and hoverable in the share plot
        assert f"<td>{w['pid']}</td>" in page
        assert f"pid {w['pid']}" in page


def _svg(page: str, kind: str) -> str:
    m = re.search(rf'<svg class="plot" data-plot="{kind}".*?</svg>', page, re.S)
    assert m, kind
    return m.group(0)


def test_share_plot_switches_to_columns_and_stays_inside_its_box(docs: dict) -> None:
    for name, rows in (("single", True), ("round-robin", True), ("many", False)):
        doc = docs[name]
        fair = 1 / len([w for w in doc["workers"] if w["role"] != "master"])
        svg = report_html.share_plot(doc["workers"], fair)
        bars = re.findall(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)" '
                          r'fill="#[0-9a-f]+"><title>pid', svg)
        assert len(bars) == len(doc["workers"])
        width, height = map(float, re.search(r'viewBox="0 0 (\d+) (\d+)"', svg).groups())
        for x, y, w, h in (tuple(map(float, b)) for b in bars):
            assert x >= 0 and y >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01
        # Rows: one label per worker. Columns: no more than ~10 pid labels under 256 columns.
        labels = re.findall(r"<text [^>]*>(?:master )?(\d+)</text>", svg)
        assert (len(labels) >= len(doc["workers"])) if rows else (len(labels) <= 16)
        assert "fair share" in svg


def test_rate_plot_keeps_8_workers_and_sums_the_others(docs: dict) -> None:
    svg, legend = report_html.rate_plot(docs["many"]["rate_history"])
    assert svg.count("<polygon") == 9 and "248 others" in legend
    svg, legend = report_html.rate_plot(docs["round-robin"]["rate_history"])
    assert svg.count("<polygon") == 8 and "others" not in legend
    # Stacked areas: the top of the stack is the total rate of each bin.
    bins = report_html._bins(docs["round-robin"]["rate_history"])
    rates = [sum(c.values()) / (b - a) for a, b, c in bins]
    assert max(rates) > 300  # heavy phases (3x150/s) are visible as such
    assert report_html.rate_plot([])[0].count("No accepts") == 1


def test_wait_histogram_rebinning_keeps_every_connection(docs: dict) -> None:
    workers = docs["concentrated"]["workers"]
    buckets = report_html.merged_wait_buckets(workers)
    total = sum(w["queue_wait_us"]["count"] for w in workers)
    assert sum(buckets.values()) == total
    assert math.isclose(sum(report_html.log_bins(buckets).values()), total, rel_tol=1e-9)
    # Same nearest-rank rule as the daemon's percentile(): one bucket scheme, one answer.
    by_index: dict[int, int] = {}
    for (low, _high), c in buckets.items():
        by_index[bucket_index(low)] = by_index.get(bucket_index(low), 0) + c
    assert all(bucket_bounds(i)[0] == low for (low, _), i in ((k, bucket_index(k[0])) for k in buckets))
    for q in (50, 99):
        assert report_html.bucket_percentile(buckets, q) == percentile(by_index, q)


def test_axis_helpers() -> None:
    assert report_html.nice_ticks(7) == [0, 2, 4, 6, 8]
    assert report_html.nice_ticks(0.13) == [0, 0.05, 0.1, 0.15]
    assert report_html.nice_ticks(3, integer=True) == [0, 1, 2, 3]
    assert report_html.nice_ticks(0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = report_html.log_ticks(1_000, 1_000_000)
    assert [v for v, labelled in ticks if labelled] == [1e3, 1e4, 1e5, 1e6]
    assert [fmt.fmt_ns(v) for v in (500, 1e3, 2.5e4, 3e6, 4e9)] == [
        "500 ns", "1 µs", "25 µs", "3 ms", "4 s"]
    assert [fmt.fmt_p(p) for p in (None, 0.0, 1e-9, 0.25)] == ["–", "< 1e-300", "1.0e-09", "0.250"]
    assert fmt.fmt_span("2026-11-27T23:59:58.5+00:00", "2026-11-28T00:00:01+00:00") == (
        "2026-11-27 23:59:58 → 2026-11-28 00:00:01 UTC")
    assert fmt.fmt_span("2026-11-27T01:00:00+00:00", None) == (
        "2026-11-27 01:00:00 UTC → still running")


# ---------------------------------------------------------------------------------------------------
# Browser
# ---------------------------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _png_colours(data: bytes) -> int:
    """Distinct byte values in the decompressed image data: a blank page has almost none."""
    pos, idat = 8, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return len(set(zlib.decompress(idat)))


def chromium_screenshot(url: str, png: Path, profile: Path, size: str = "1366,900") -> bytes:
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={size}", url],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]
    return png.read_bytes()


@pytest.mark.browser
def test_html_renders_in_chromium(tmp_path: Path) -> None:
    if not os.access(CHROMIUM, os.X_OK) and not os.environ.get("CI"):
        pytest.skip(f"{CHROMIUM} is not installed")
    out = tmp_path / "r.html"
    proc = run_cli(str(write(tmp_path, simulate(**CONCENTRATED))), "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><title>x</title>")
    data = chromium_screenshot(out.as_uri(), tmp_path / "report.png", tmp_path / "profile")
    empty = chromium_screenshot(blank.as_uri(), tmp_path / "blank.png", tmp_path / "profile2")
    assert _png_size(data) == (1366, 900)
    # A rendered report is far larger and more colourful than a blank page of the same size.
    assert len(data) > 20_000 and len(data) > 5 * len(empty), (len(data), len(empty))
    assert _png_colours(data) > 3 * _png_colours(empty)
