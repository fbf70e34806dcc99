"""The four views of one document - terminal, dashboard page, /metrics, report (text and HTML) - state
the same verdict and figures: they all render the document's `analysis`, none computes its own.

The document comes from the real aggregator and analysis (the synthetic source feeds them simulated
kernel counters); the page is the real one, in Chromium, served by the real dashboard server.
"""

from __future__ import annotations

import html
import json

import pytest
from browser import Chromium
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from accept_watch.daemon import report, terminal
from accept_watch.daemon.report_html import render_html
from accept_watch.dashboard import DashboardServer, create_app
from accept_watch.dashboard.demo import SyntheticSource


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def source() -> SyntheticSource:
    src = SyntheticSource(8, seed=3, skew=1.2)
    src.advance(90)
    return src


@pytest.fixture(scope="module")
def doc(source: SyntheticSource) -> dict:
    d = source.snapshot()
    assert d["analysis"]["verdict"]["pattern"] == "concentrated"  # a verdict worth agreeing on
    return d


def test_terminal_states_the_verdict_and_fair_share(doc: dict) -> None:
    analysis = doc["analysis"]
    text = _flat(terminal.render(doc, width=400))
    assert _flat(analysis["verdict"]["sentence"]) in text
    fair = analysis["competitors"]["fair_share"]
    assert f"fair {fair * 100:.1f}%" in text
    line = terminal.summary_line(doc)
    n = len(analysis["competitors"]["pids"])
    assert f"by {n} workers" in line and f"(fair {fair * 100:.1f}%)" in line


def test_report_recomputes_the_same_analysis_and_states_it(doc: dict) -> None:
    result, warning = report.recompute(report.load_document(json.loads(json.dumps(doc))).to_dict())
    assert warning is None
    assert result == doc["analysis"]  # the same version concludes the same, to the last figure
    verdict, fairness = result["verdict"], result["fairness"]
    text = _flat(report.summary(doc, result, width=400))
    assert f"verdict: {verdict['pattern']} ({verdict['confidence']} confidence)" in text
    assert _flat(verdict["sentence"]) in text
    assert f"Jain {fairness['jain']:.3g}" in text
    assert f"fair share {result['competitors']['fair_share'] * 100:.1f} %" in text
    page = _flat(render_html(doc, result))
    assert _flat(html.escape(verdict["sentence"])) in page
    assert f">{len(result['competitors']['pids'])}<" in page  # the "workers competing" tile


def test_metrics_state_the_verdict_of_every_port(source: SyntheticSource, doc: dict) -> None:
    with TestClient(create_app(source, token=None, allowed_hosts={"testserver"})) as client:
        text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    info = {s.labels["port"]: s.labels for s in families["accept_watch_verdict_info"].samples}
    assert set(info) == set(doc["analysis"]["per_port"])
    for port, verdict in doc["analysis"]["per_port"].items():
        assert info[port]["pattern"] == verdict["pattern"].replace(" ", "_")
        assert info[port]["confidence"] == verdict["confidence"]
        assert info[port]["cause"] == (verdict.get("cause") or "").replace(" ", "_")
    owed = {s.labels["pid"]: s.value for s in families["accept_watch_worker_fair_share_ratio"].samples}
    fair = doc["analysis"]["competitors"]["fair_share"]
    assert set(owed) == {str(p) for p in doc["analysis"]["competitors"]["pids"]}
    assert all(v == pytest.approx(fair, abs=0.002) for v in owed.values())  # nobody exited: 1/n each


@pytest.mark.browser
def test_page_states_the_verdict_and_figures(browser: Chromium, source: SyntheticSource, doc: dict) -> None:
    analysis = doc["analysis"]
    with DashboardServer(source) as server, browser.open(server.url) as page:
        page.wait_for(f"document.querySelector('[data-testid=total]').dataset.value === "
                      f"'{doc['total_accepts']}'")
        shown = json.loads(page.evaluate("""JSON.stringify({
          sentence: document.querySelector('[data-testid=fairness]').textContent,
          source: document.querySelector('[data-testid=fairness]').dataset.source,
          figure: document.querySelector('[data-testid=fairness-figure]').textContent,
          ideal: [...document.querySelectorAll('.bar-ideal')].map(e => e.title),
        })"""))
    assert shown["source"] == "analysis"
    assert shown["sentence"] == analysis["verdict"]["sentence"]
    fairness = analysis["fairness"]
    assert shown["figure"] == (f"busiest {fairness['max_mean_ratio']:.1f}× fair share · "
                               f"Jain index {fairness['jain']:.2f}")
    fair = analysis["competitors"]["fair_share"]
    assert shown["ideal"] and set(shown["ideal"]) == {f"fair share {fair * 100:.1f}\u00a0%"}  # NBSP
