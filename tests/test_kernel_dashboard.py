"""The real page in headless Chromium, fed by a real accept-watch attached to real gunicorn under load."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from browser import Chromium, chromium_available
from prometheus_client.parser import text_string_to_metric_families

from demo.loadgen import LoadGenerator
from tests import servers
from tests.watcher import free_port, start_watch

pytestmark = [pytest.mark.kernel, pytest.mark.browser, pytest.mark.usefixtures("kernel_ok")]

DOCS = Path(__file__).resolve().parent.parent / "docs"

PAGE_STATE = """JSON.stringify({
  total: Number(document.querySelector('[data-testid=total]').dataset.value || -1),
  probe: document.querySelector('[data-testid=probe]').textContent,
  rows: [...document.querySelectorAll('[data-testid=worker-row]')].map(
          r => ({pid: Number(r.dataset.pid), accepts: Number(r.dataset.accepts), text: r.textContent})),
})"""


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_page_and_metrics_follow_a_real_server(tmp_path: Path) -> None:
    if not chromium_available():
        pytest.skip("Debian's chromium is not installed")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with servers.start_gunicorn(workers=8, worker_class="sync") as srv:
        run = start_watch(srv.master_pid, tmp_path, dashboard=f"127.0.0.1:{port}")
        load = LoadGenerator("127.0.0.1", srv.port, concurrency=4, rate_per_s=None)
        try:
            with Chromium() as browser, browser.open(base + "/") as page:
                load.start()
                page.wait_for("Number(document.querySelector('[data-testid=total]').dataset.value) > 0",
                              timeout=15)
                first = json.loads(page.evaluate(PAGE_STATE))
                # The page follows the load (pushes come once a second; allow for a loaded machine).
                page.wait_for(f"Number(document.querySelector('[data-testid=total]').dataset.value)"
                              f" > {first['total']}", timeout=10)
                if os.environ.get("ACCEPT_WATCH_UPDATE_DOCS"):
                    shot = page.screenshot(tmp_path / "dashboard.png", full_page=True)
                    shutil.copy(shot, DOCS / "dashboard.png")
                load.stop()
                # Once the load stops, the page and the API settle on the same numbers.
                time.sleep(1.5)
                snap = json.loads(_get(base + "/api/snapshot"))
                page.wait_for(f"Number(document.querySelector('[data-testid=total]').dataset.value)"
                              f" === {snap['total_accepts']}", timeout=10)
                state = json.loads(page.evaluate(PAGE_STATE))
                # gunicorn sync workers wait in select(): the page says so.
                waits = page.evaluate("document.querySelector('[data-testid=wait-modes]')?.textContent")
                assert waits and "poll/select" in waits, waits
                assert page.errors == []
            assert state["probe"].startswith(snap["probe"])
            assert {r["pid"]: r["accepts"] for r in state["rows"]} == {
                w["pid"]: w["accepts"] for w in snap["workers"]}
            for pid in srv.worker_pids():
                assert any(r["pid"] == pid and str(pid) in r["text"] for r in state["rows"]), pid

            families = {f.name: f for f in text_string_to_metric_families(_get(base + "/metrics"))}
            per_pid = {s.labels["pid"]: s.value for s in families["accept_watch_worker_accepts"].samples
                       if s.name == "accept_watch_worker_accepts_total"}
            # Live accepting processes one series each, and the (here empty) exited aggregate.
            assert per_pid == {str(w["pid"]): w["accepts"] for w in snap["workers"]
                               if w["alive"] and (w["role"] == "worker" or w["accepts"])} | {"exited": 0}
        finally:
            load.stop()
            assert run.stop() == 0, run.stderr()
        truth = srv.ground_truth()
    final = run.document()
    assert {w["pid"]: w["accepts"] for w in final["workers"] if w["accepts"]} == truth
    assert final["total_accepts"] == sum(truth.values()) == snap["total_accepts"]
