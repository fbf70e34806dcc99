"""`accept-watch report`: verdict from an export, one-line errors, a self-contained HTML report."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from accept_watch.daemon import analysis
from accept_watch.probes.histogram import bucket_bounds, bucket_index

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _worker(pid: int, accepts: int, total: int, waits_ns: list[int], inflight_max: int = 1) -> dict:
    hist: dict[int, int] = {}
    for v in waits_ns:
        hist[bucket_index(v)] = hist.get(bucket_index(v), 0) + 1
    return {
        "pid": pid, "ppid": 1, "cmdline": "gunicorn: worker", "role": "worker", "accepts": accepts,
        "share": accepts / total if total else 0.0, "alive": True, "first_seen": None, "last_seen": None,
        "rate": {"1s": 0.0, "10s": 0.0, "60s": 0.0},
        "queue_wait_us": {"p50": 50.0, "p99": 90.0, "max": 100.0, "mean": 55.0, "count": len(waits_ns)},
        "queue_wait_hist": [[*bucket_bounds(i), c] for i, c in sorted(hist.items())],
        "inflight": {"now": 0, "max": inflight_max, "busy_accepts": max(0, inflight_max - 1) * 3,
                     "closed": accepts, "life_ms": {"mean": 2.0, "max": 9.0}},
    }


def make_doc(sequence: list[int], pids: list[int]) -> dict:
    """An export whose counts and transitions come from an accept sequence."""
    counts = {p: sequence.count(p) for p in pids}
    total = len(sequence)
    rng = random.Random(7)
    transitions: dict[tuple[int, int], int] = {}
    for a, b in itertools.pairwise(sequence):
        transitions[(a, b)] = transitions.get((a, b), 0) + 1
    history = [[float(t), {str(p): sequence[t * 10:(t + 1) * 10].count(p) for p in pids}]
               for t in range(max(1, total // 10))]
    return {
        "schema": "accept-watch/1", "tool_version": "0.1.0", "master_pid": 1, "master_cmdline": "gunicorn",
        "probe": "tracepoint", "probe_detail": "", "kernel": "6.18",
        "started_at": "2026-11-27T00:00:00+00:00", "updated_at": "2026-11-27T00:01:00+00:00",
        "ended_at": "2026-11-27T00:01:00+00:00", "duration_s": 60.0,
        "total_accepts": total, "lost_events": 0, "unattributed": 0, "diagnostics": {},
        "listeners": [{"address": "127.0.0.1", "port": 8000, "family": "ipv4", "inode": 9, "mode": "shared",
                       "pids": pids, "accepts": total,
                       "queue_depth": {"current": 0, "max": 3, "limit": 128}, "depth_history": []}],
        "workers": [_worker(p, counts[p], total, [rng.randint(20_000, 200_000) for _ in range(counts[p])])
                    for p in pids],
        "rate_history": history,
        "transitions": [{"port": 8000, "from": a, "to": b, "count": c} for (a, b), c in transitions.items()],
        "analysis": {},
    }


def run_report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "accept_watch.daemon.cli", "report", *args],
                          capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, doc: dict, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


ROUND_ROBIN = [1001 + i % 8 for i in range(800)]
CONCENTRATED = [1001 if i % 10 else 1001 + (i // 10) % 8 for i in range(800)]


@pytest.mark.parametrize(("sequence", "pattern"),
                         [(ROUND_ROBIN, "round-robin"), (CONCENTRATED, "concentrated")])
def test_report_states_the_analysis_verdict(tmp_path: Path, sequence: list[int], pattern: str) -> None:
    doc = make_doc(sequence, list(range(1001, 1009)))
    expected = analysis.analyze(doc)["verdict"]
    assert expected["pattern"] == pattern
    proc = run_report(str(write(tmp_path, doc)))
    assert proc.returncode == 0, proc.stderr
    assert expected["sentence"][:60] in " ".join(proc.stdout.split())
    as_json = json.loads(run_report(str(write(tmp_path, doc)), "--json").stdout)
    assert as_json["verdict"]["sentence"] == expected["sentence"]


def test_a_stored_verdict_that_differs_is_pointed_out(tmp_path: Path) -> None:
    doc = make_doc(ROUND_ROBIN, list(range(1001, 1009)))
    doc["analysis"] = {"verdict": {"sentence": "Something else entirely."}}
    proc = run_report(str(write(tmp_path, doc)))
    assert proc.returncode == 0
    assert "stored verdict differs" in proc.stderr


class _Checker(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.svgs = 0
        self.stack: list[str] = []
        self.void = {"meta", "br", "line", "rect", "polyline"}

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.svgs += tag == "svg"
        if tag not in self.void:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.void:
            return
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


@pytest.mark.parametrize("workers", [1, 8, 256])
def test_html_is_self_contained_and_well_formed(tmp_path: Path, workers: int) -> None:
    pids = list(range(2000, 2000 + workers))
    rng = random.Random(workers)
    doc = make_doc([rng.choice(pids) for _ in range(max(200, workers * 12))], pids)
    out = tmp_path / "r.html"
    proc = run_report(str(write(tmp_path, doc)), "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    checker = _Checker()
    checker.feed(text)
    assert checker.stack == []
    assert checker.svgs == 4  # share, rate, queue wait, in-flight
    without_xmlns = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in without_xmlns and "https://" not in without_xmlns and "<script" not in text
    for pid in pids[:64]:
        assert f">{pid}<" in text


def test_zero_accepts_still_reports(tmp_path: Path) -> None:
    doc = make_doc([], [3001, 3002])
    proc = run_report(str(write(tmp_path, doc)), "--html", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    assert "not enough data" in proc.stdout.lower()


@pytest.mark.parametrize(("content", "needle"), [
    (None, "no such file"),
    ("{not json", "not JSON"),
    ('{"schema": "other/9"}', "schema 'other/9'"),
    ('{"schema": "accept-watch/1"}', "missing key(s)"),
    ("[1, 2]", "JSON object"),
])
def test_bad_input_is_one_line(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    proc = run_report(str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_unwritable_html_path_is_one_line(tmp_path: Path) -> None:
    doc = write(tmp_path, make_doc(ROUND_ROBIN, list(range(1001, 1009))))
    proc = run_report(str(doc), "--html", str(tmp_path / "missing" / "r.html"))
    assert proc.returncode == 2 and "directory does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.browser
def test_html_renders_in_chromium(tmp_path: Path) -> None:
    from browser import chromium_available, screenshot

    if not chromium_available():
        pytest.skip("Debian's chromium is not installed")
    doc = make_doc(CONCENTRATED, list(range(1001, 1009)))
    out = tmp_path / "r.html"
    assert run_report(str(write(tmp_path, doc)), "--html", str(out)).returncode == 0
    png = screenshot(out.as_uri(), tmp_path / "report.png", ready="document.readyState === 'complete'",
                     full_page=True)
    data = Path(png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    if os.environ.get("ACCEPT_WATCH_UPDATE_DOCS"):
        (DOCS / "report.png").write_bytes(data)
