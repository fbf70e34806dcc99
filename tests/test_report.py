"""`accept-watch report`: the verdict of analysis.analyze, a terminal summary, one-line errors
(exports from tests/reportsim.py). The HTML page is tests/test_report_html.py's."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from accept_watch.daemon import analysis, fmt, report, report_html
from tests.reportsim import (
    CONCENTRATED,
    INODE,
    MASTER,
    PORT,
    all_patterns,
    check_page,
    run_cli,
    run_inproc,
    simulate,
    squash,
    write,
)


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return all_patterns()


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


