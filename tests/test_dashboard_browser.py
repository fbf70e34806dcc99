"""The real dashboard page in headless chromium, fed by the synthetic source through the real server."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from browser import Chromium, Page, chromium_available, screenshot

from accept_watch.dashboard import DashboardServer
from accept_watch.dashboard.demo import SyntheticSource

pytestmark = pytest.mark.browser

ROWS = "[...document.querySelectorAll('[data-testid=worker-row]')]"
READ_PAGE = f"""JSON.stringify({{
  updates: Number(document.body.dataset.updates || 0),
  total: document.querySelector('[data-testid=total]').dataset.value,
  totalText: document.querySelector('[data-testid=total]').textContent,
  lost: document.querySelector('[data-testid=lost]').dataset.value,
  unattributed: document.querySelector('[data-testid=unattributed]').dataset.value,
  banner: document.querySelector('[data-testid=loss-banner]').hidden ? null
          : document.querySelector('[data-testid=loss-banner]').textContent,
  fairness: document.querySelector('[data-testid=fairness]').textContent,
  fairnessSource: document.querySelector('[data-testid=fairness]').dataset.source,
  rows: {ROWS}.map(r => ({{pid: Number(r.dataset.pid), accepts: Number(r.dataset.accepts),
                         alive: r.dataset.alive === 'true', exited: r.classList.contains('exited'),
                         text: r.textContent}})),
  status: document.querySelector('[data-testid=status]').textContent,
}})"""


def read(page: Page) -> dict:
    return json.loads(page.evaluate(READ_PAGE))


def wait_for_total(page: Page, total: int, timeout: float = 6.0) -> dict:
    page.wait_for(
        f"document.querySelector('[data-testid=total]').dataset.value === '{total}'", timeout=timeout
    )
    return read(page)


def assert_matches(state: dict, doc: dict) -> None:
    assert int(state["total"]) == doc["total_accepts"]
    assert state["totalText"].replace(",", "") == str(doc["total_accepts"])
    assert [r["pid"] for r in state["rows"]] == [w["pid"] for w in doc["workers"]]
    assert {r["pid"]: r["accepts"] for r in state["rows"]} == {w["pid"]: w["accepts"] for w in doc["workers"]}
    assert {r["pid"]: r["alive"] for r in state["rows"]} == {w["pid"]: w["alive"] for w in doc["workers"]}
    assert int(state["lost"]) == doc["lost_events"]
    assert int(state["unattributed"]) == doc["unattributed"]


def test_page_shows_every_worker_and_follows_the_source(browser: Chromium) -> None:
    source = SyntheticSource(8, seed=5)
    source.advance(90)
    with DashboardServer(source) as server, browser.open(server.url) as page:
        state = wait_for_total(page, source.snapshot()["total_accepts"])
        assert_matches(state, source.snapshot())
        assert state["banner"] is None
        assert state["status"] == "live"
        assert state["fairnessSource"] == "analysis"  # the page computes no verdict of its own
        assert state["fairness"] == source.snapshot()["analysis"]["verdict"]["sentence"]
        for row in state["rows"]:  # each bar is labelled with its pid
            assert str(row["pid"]) in row["text"]

        # The page follows the source: new traffic, an exited worker, losses, a daemon verdict.
        source.advance(5)
        source.exit_worker(source.pids[3])
        source.add_losses(lost_events=7, unattributed=3)
        source.set_analysis({"verdict": {"sentence": "Shared socket, epoll wake-ups: LIFO concentration."}})
        doc = source.snapshot()
        assert doc["total_accepts"] > int(state["total"])
        state = wait_for_total(page, doc["total_accepts"])
        assert_matches(state, doc)
        exited = next(r for r in state["rows"] if r["pid"] == source.pids[3])
        assert exited["exited"] and "exited" in exited["text"]
        assert "3 accepted connection(s) could not be attributed" in state["banner"]
        assert "7 per-connection event(s) were lost" in state["banner"]
        assert state["fairness"] == "Shared socket, epoll wake-ups: LIFO concentration."
        assert state["fairnessSource"] == "analysis"
        assert page.errors == []


def test_updates_arrive_at_least_once_per_second(browser: Chromium) -> None:
    source = SyntheticSource(3)
    source.advance(10)
    with DashboardServer(source) as server, browser.open(server.url) as page:
        page.wait_for("Number(document.body.dataset.updates || 0) >= 1")
        first = read(page)["updates"]
        browser.pump(3.5)
        assert read(page)["updates"] - first >= 3


@pytest.mark.parametrize("workers", [1, 256])
def test_page_handles_one_to_many_workers(browser: Chromium, workers: int) -> None:
    source = SyntheticSource(workers, seed=workers)
    source.advance(60)
    with DashboardServer(source) as server, browser.open(server.url) as page:
        doc = source.snapshot()
        state = wait_for_total(page, doc["total_accepts"], timeout=10)
        assert_matches(state, doc)
        legend = page.evaluate(
            "[...document.querySelectorAll('[data-testid=rate-legend-item]')].map(e => e.textContent)"
        )
        assert state["fairness"] == doc["analysis"]["verdict"]["sentence"]
        if workers == 1:
            assert doc["analysis"]["verdict"]["pattern"] == "single-acceptor"
            assert len(legend) == 1
        else:
            assert len(legend) == 9 and legend[-1].startswith("others (")  # top 8 + others
        assert page.errors == []


def test_page_passes_the_token_on(browser: Chromium) -> None:
    source = SyntheticSource(4)
    source.advance(20)
    with DashboardServer(source, token="browser-token-123") as server:
        assert "?token=browser-token-123" in server.url
        with browser.open(server.url) as page:
            state = wait_for_total(page, source.snapshot()["total_accepts"])  # assets + SSE all authorised
            assert_matches(state, source.snapshot())
            href = page.evaluate("document.querySelector('[data-testid=download]').getAttribute('href')")
            assert href == "/api/snapshot?download=1&token=browser-token-123"
            assert page.errors == []


def test_layout_fits_a_laptop_screen(browser: Chromium) -> None:
    source = SyntheticSource(16)
    source.advance(120)
    with DashboardServer(source) as server, browser.open(server.url) as page:
        wait_for_total(page, source.snapshot()["total_accepts"])
        assert page.evaluate("document.documentElement.scrollWidth") <= 1366  # no sideways scrolling
        # The headline figures and the worker bars are visible without scrolling.
        for testid in ("total", "lost", "unattributed", "fairness", "worker-bars", "rate-chart"):
            rect = page.evaluate(
                f"JSON.stringify(document.querySelector('[data-testid={testid}]').getBoundingClientRect())"
            )
            box = json.loads(rect)
            assert box["top"] >= 0 and box["top"] < 768 and box["width"] > 0, (testid, box)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_screenshot_helper(tmp_path: Path) -> None:
    if not chromium_available():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing: browser tests cannot be skipped under CI")
        pytest.skip("/usr/bin/chromium is missing")
    source = SyntheticSource(8)
    source.advance(120)
    with DashboardServer(source) as server:
        out = screenshot(server.url, tmp_path / "dashboard.png")
        assert png_size(out) == (1366, 768)
        full = screenshot(server.url, tmp_path / "full.png", full_page=True)
        width, height = png_size(full)
        assert width == 1366 and height >= 768
