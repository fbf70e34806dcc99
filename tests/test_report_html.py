"""`accept-watch report --html`: a self-contained, well-formed page (exports from tests/reportsim.py),
its plots and axis helpers, and the page rendered in headless Chromium."""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from accept_watch.daemon import analysis, fmt, report_html
from accept_watch.probes.histogram import bucket_bounds, bucket_index, percentile
from tests.reportsim import (
    CONCENTRATED,
    all_patterns,
    check_page,
    run_cli,
    simulate,
    write,
)

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return all_patterns()


# ---------------------------------------------------------------------------------------------------
# The HTML page
# ---------------------------------------------------------------------------------------------------

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
