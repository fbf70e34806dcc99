"""The page shows each worker's pid inside its container next to the host pid, and the master's
container (real page in Debian's chromium, the synthetic source dressed as a containerised server)."""

from __future__ import annotations

import json

import pytest
from browser import Chromium

from accept_watch.dashboard import DashboardServer
from accept_watch.dashboard.demo import SyntheticSource

pytestmark = pytest.mark.browser
CID = "027e9aa020aba677187a546cfc729090806bab65d6a5db6c74ee6fb7b2cc5aef"
HOSTILE = "/libpod_parent/<img src=x onerror=alert(1)>/libpod-" + CID


class InContainer(SyntheticSource):
    """The synthetic server as if in a podman container: nspid = host pid - master pid + 1."""

    def snapshot(self) -> dict:
        doc = super().snapshot()
        container = {"id": CID, "runtime": "podman", "cgroup": HOSTILE}
        for w in doc["workers"]:
            w["nspid"] = w["pid"] - self.master_pid + 1
            w["container"] = container
        # The synthetic source runs the real aggregator, whose document lists the master too.
        assert doc["workers"][0]["pid"] == self.master_pid and doc["workers"][0]["nspid"] == 1
        return doc


def test_page_shows_nspid_and_container(browser: Chromium) -> None:
    source = InContainer(4, seed=3)
    source.advance(30)
    with DashboardServer(source) as server, browser.open(server.url) as page:
        total = source.snapshot()["total_accepts"]
        page.wait_for(f"document.querySelector('[data-testid=total]').dataset.value === '{total}'")
        state = json.loads(page.evaluate("""JSON.stringify({
          rows: [...document.querySelectorAll('[data-testid=worker-row]')].map(r => ({
            pid: Number(r.dataset.pid), nspid: Number(r.dataset.nspid), text: r.textContent,
            title: r.title})),
          master: document.querySelector('[data-testid=master-container]').textContent,
          masterTitle: document.querySelector('[data-testid=master-container]').title,
          imgs: document.querySelectorAll('img').length,
        })"""))
        doc = source.snapshot()
        shown = [(r["pid"], r["nspid"]) for r in state["rows"]]
        assert shown == [(w["pid"], w["nspid"]) for w in doc["workers"]]
        for r in state["rows"]:
            assert f"{r['pid']} · {r['nspid']}" in r["text"]
            assert f"pid {r['nspid']} in its container" in r["title"] and CID in r["title"]
        assert state["master"] == f"podman {CID[:12]} (pid 1 inside)"
        assert HOSTILE in state["masterTitle"]  # shown as text, never parsed as markup
        assert state["imgs"] == 0
        assert page.errors == []
