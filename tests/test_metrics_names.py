"""/metrics names, labels and bounds, from documents (pure logic; the real scrape: test_prometheus.py)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from accept_watch.daemon.discovery import ListenDepths
from accept_watch.dashboard.metrics import (
    EXITED,
    SERVER_NAME_MAX,
    document_metrics,
    make_registry,
    server_name,
)
from accept_watch.dashboard.metrics_losses import LOSS_METRICS
from accept_watch.probes.histogram import bucket_index
from accept_watch.probes.records import DiagCounter, ListenerCounters
from tests.test_stats import INODE, PORT, START, S, make, snap, topo, wc

DOC = json.loads((Path(__file__).parent / "data" / "metrics_doc.json").read_text())


def scrape(doc: Any, server: str | None = None) -> dict[str, list]:
    text = generate_latest(make_registry(lambda: doc, server)).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_every_kernel_loss_counter_has_one_metric() -> None:
    """Each diagnostic slot maps to exactly one (metric, reason): none left out, none mixed twice."""
    keys = [key for _help, reasons in LOSS_METRICS.values() for key in reasons.values()]
    assert sorted(keys) == sorted([c.name.lower() for c in DiagCounter] + ["evicted_workers"])
    m = scrape(DOC)
    for name, (_help, reasons) in LOSS_METRICS.items():
        samples = [s for s in m[name] if s.name == name + "_total"]
        assert len(samples) == len(reasons), name
        assert all(s.value == 0 for s in samples)  # present at 0, so increase() alerts work from the start


def test_names_follow_conventions() -> None:
    m = scrape(DOC)
    for name, samples in m.items():
        for s in samples:
            if name.startswith("accept_watch_"):
                assert s.labels.get("server") == "gunicorn:" + str(DOC["listeners"][0]["port"]), s
            assert not s.name.endswith("_duration_seconds"), s  # a start timestamp instead
            if s.name.endswith("_ratio"):
                assert 0 <= s.value <= 1 or "load" in s.name, s  # load vs fair share: 1 = fair
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= {
        s.name for samples in m.values() for s in samples}
    assert [s.value for s in m["accept_watch_listen_drops"]] == [7]
    verdict = DOC["analysis"]["per_port"]
    (info,) = m["accept_watch_verdict_info"]
    port = next(iter(verdict))
    assert (info.labels["port"], info.labels["pattern"], info.labels["cause"]) == (
        port, verdict[port]["pattern"], verdict[port]["cause"])
    load = {s.labels["pid"]: s.value for s in m["accept_watch_worker_fair_share_load_ratio"]}
    fair = DOC["fair_share"][port]
    assert load == {pid: pytest.approx(fair["observed"][pid] / e) for pid, e in fair["expected"].items()}


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian prometheus) not installed")
def test_promtool_accepts_the_exposition() -> None:
    text = generate_latest(make_registry(lambda: DOC))
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


@pytest.mark.parametrize(("cmdline", "ports", "expected"), [
    ("gunicorn: master [app]", [8000], "gunicorn:8000"),
    ("/usr/bin/python3 -u -m gunicorn -w 4 app:app", [9000, 80], "gunicorn:80"),
    ("nginx: master process /usr/sbin/nginx -g daemon off;", [443], "nginx:443"),
    ("/usr/sbin/apache2 -k start", [], "apache2"),
    ("", [8080], "pid100:8080"),
    ("\x1b[31mevil\x07 name", [1], "31mevil:1"),
])
def test_server_name_default(cmdline: str, ports: list[int], expected: str) -> None:
    doc = {"master_pid": 100, "master_cmdline": cmdline, "listeners": [{"port": p} for p in ports]}
    assert server_name(doc) == expected


def test_server_name_override_and_bounds() -> None:
    assert server_name(DOC, "web-1") == "web-1"
    assert server_name({**DOC, "server": "from doc"}) == "from_doc"
    assert server_name({**DOC, "server": "from doc"}, "arg") == "arg"
    assert len(server_name(DOC, "x" * 10_000)) == SERVER_NAME_MAX
    assert server_name({}) == "unknown"
    m = scrape(DOC, "web-1")
    assert {s.labels["server"] for s in m["accept_watch_worker_accepts"]} == {"web-1"}


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            out.append((*prefix, i))
            out.extend(_paths(v, (*prefix, i)))
    return out


@pytest.mark.parametrize("bad", [None, "x", -1, float("nan"), [], {}, True])
def test_any_field_of_any_type_leaves_a_sample_out_never_fails(bad: Any) -> None:
    """Every field of a current document (fair_share, masters, verdict cause, drops...) replaced in
    turn: the exposition still renders."""
    failures = []
    for path in _paths(DOC):
        doc = copy.deepcopy(DOC)
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = bad
        try:
            list(document_metrics(doc))
        except Exception as exc:
            failures.append((path, repr(exc)))
    assert not failures, failures[:5]
    assert list(document_metrics({}))  # even an empty document


def test_exited_workers_fold_into_one_series_that_never_goes_down() -> None:
    """Per-worker series for live workers only; the exited aggregate and the server histogram keep
    every exited worker's accepts and waits, also after the daemon evicts their records."""
    agg, _ = make(topo([]), max_exited=2)
    counts: dict[int, int] = {}
    hist: dict = {}
    workers = []
    previous = (0.0, 0.0)
    for i in range(6):
        pid = 200 + i
        counts[pid] = 10 + i
        hist[(pid, PORT)] = {bucket_index(50_000): 10 + i}
        workers = [wc(p, c, wait_count=c, wait_sum=c * 50_000) for p, c in counts.items()]
        agg.update(snap(START + (2 * i + 1) * S, workers, hist), topo([pid]), {})
        m = scrape(agg.document())
        accepts = {s.labels["pid"]: s.value for s in m["accept_watch_worker_accepts"]
                   if s.name.endswith("_total")}
        assert accepts == {str(pid): 10 + i, EXITED: sum(range(10, 10 + i))}
        count = next(s.value for s in m["accept_watch_queue_wait_seconds"] if s.name.endswith("_count"))
        total_s = next(s.value for s in m["accept_watch_queue_wait_seconds"] if s.name.endswith("_sum"))
        assert count == sum(counts.values()) and count >= previous[0] and total_s >= previous[1]
        assert total_s == pytest.approx(count * 50e-6)
        previous = (count, total_s)
        agg.update(snap(START + (2 * i + 2) * S, workers, hist), topo([]), {})  # and it exits
    doc = agg.document()
    assert doc["diagnostics"]["evicted_workers"] == 4
    assert doc["evicted_queue_wait"]["count"] == sum(range(10, 14))


def test_listener_drops_reach_the_document() -> None:
    agg, _ = make()
    kernel = [ListenerCounters(INODE, PORT, 4, 1, 64)]
    agg.update(snap(START + S, listeners=kernel), topo(), {INODE: 1})
    assert agg.document()["listeners"][0]["drops"] is None  # a plain mapping: drops unknown
    agg.update(snap(START + 2 * S, listeners=kernel), topo(), ListenDepths({INODE: 2}, {INODE: 5}))
    (lst,) = agg.document()["listeners"]
    assert (lst["drops"], lst["queue_depth"]["current"]) == (5, 2)
    m = scrape(agg.document())
    assert [(s.labels["port"], s.value) for s in m["accept_watch_listen_drops"]] == [(str(PORT), 5)]
    # The listener closes: its series end (no label sets piling up across restarts).
    agg.update(snap(START + 3 * S, listeners=kernel), topo(listeners=[]), {})
    assert scrape(agg.document())["accept_watch_listen_drops"] == []
