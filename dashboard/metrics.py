"""Prometheus exposition built from the snapshot document at scrape time.

A custom Collector (rather than long-lived Counter/Gauge objects) keeps /metrics a pure function of
the same document /api/snapshot serves, so both can never disagree and nothing needs updating between
scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

# Fixed histogram bounds (seconds) for accept_watch_queue_wait_seconds, as integer ns so that bucket
# assignment is exact. Fixed bounds keep the series stable across scrapes and runs.
LE_BOUNDS_NS: tuple[int, ...] = (
    10_000, 25_000, 50_000,
    100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000,
    10_000_000, 25_000_000, 50_000_000,
    100_000_000, 250_000_000, 500_000_000,
    1_000_000_000, 2_500_000_000, 5_000_000_000,
    10_000_000_000,
)  # fmt: skip


def _le_label(bound_ns: int) -> str:
    return repr(bound_ns / 1e9)


def cumulative_buckets(hist: Iterable[Sequence[int]]) -> tuple[list[tuple[str, int]], int]:
    """Turn [[low_ns, high_ns, count], ...] into Prometheus cumulative (le, count) pairs and the total.

    Each source bucket goes to the first bound that its high end fits under: values are integer ns
    below high_ns, so `high_ns - 1 <= le` means every sample of the bucket is <= le. A bucket straddling
    a bound is therefore counted at the next bound up (an upper estimate, never an under-count).
    """
    per_bound = [0] * len(LE_BOUNDS_NS)
    total = 0
    for entry in hist:
        if len(entry) != 3:
            raise ValueError(f"queue_wait_hist entry must be [low_ns, high_ns, count], got {entry!r}")
        _low, high, count = (int(x) for x in entry)
        total += count
        for i, bound in enumerate(LE_BOUNDS_NS):
            if high - 1 <= bound:
                per_bound[i] += count
                break
    buckets: list[tuple[str, int]] = []
    running = 0
    for bound, count in zip(LE_BOUNDS_NS, per_bound, strict=True):
        running += count
        buckets.append((_le_label(bound), running))
    buckets.append(("+Inf", total))
    return buckets, total


class SnapshotCollector(Collector):
    """Collects accept_watch_* metrics from `snapshot()` on every scrape."""

    def __init__(self, snapshot: Callable[[], Mapping]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        # Nothing up front: describing would mean taking a snapshot at registration time.
        return []

    def collect(self) -> Iterable[Metric]:
        doc = self._snapshot()
        yield from worker_metrics(doc)
        yield from listener_metrics(doc)
        yield from run_metrics(doc)


def worker_metrics(doc: Mapping) -> Iterable[Metric]:
    accepts = CounterMetricFamily(
        "accept_watch_accepts", "Connections accepted by each process (all listening ports)", labels=["pid"]
    )
    alive = GaugeMetricFamily(
        "accept_watch_worker_alive", "1 while the worker process exists", labels=["pid"]
    )
    share = GaugeMetricFamily(
        "accept_watch_worker_share",
        "Fraction of all accepted connections taken by the worker",
        labels=["pid"],
    )
    wait = HistogramMetricFamily(
        "accept_watch_queue_wait_seconds",
        "Time from handshake completion to accept() return, per accepting process",
        labels=["pid"],
    )
    for w in doc["workers"]:
        pid = str(int(w["pid"]))
        accepts.add_metric([pid], int(w["accepts"]))
        alive.add_metric([pid], 1 if w["alive"] else 0)
        share.add_metric([pid], float(w["share"]))
        buckets, total = cumulative_buckets(w["queue_wait_hist"])
        mean_us = w["queue_wait_us"].get("mean")
        # The exact sum (mean * count) comes from the kernel's running sum, not from bucket midpoints.
        wait_sum = 0.0 if not total or mean_us is None else mean_us * 1e-6 * int(w["queue_wait_us"]["count"])
        wait.add_metric([pid], buckets, wait_sum)
    yield from (accepts, alive, share, wait)


def listener_metrics(doc: Mapping) -> Iterable[Metric]:
    labels = ["address", "port", "inode"]
    depth = GaugeMetricFamily(
        "accept_watch_listen_queue_depth", "Accept-queue length after the latest accept", labels=labels
    )
    depth_max = GaugeMetricFamily(
        "accept_watch_listen_queue_max", "Highest accept-queue length seen since attach", labels=labels
    )
    limit = GaugeMetricFamily("accept_watch_listen_queue_limit", "Listen backlog limit", labels=labels)
    accepts = CounterMetricFamily(
        "accept_watch_listener_accepts", "Connections accepted from each listening socket", labels=labels
    )
    for listener in doc["listeners"]:
        key = [str(listener["address"]), str(int(listener["port"])), str(int(listener["inode"]))]
        q = listener["queue_depth"]
        depth.add_metric(key, int(q["current"]))
        depth_max.add_metric(key, int(q["max"]))
        limit.add_metric(key, int(q["limit"]))
        accepts.add_metric(key, int(listener["accepts"]))
    yield from (depth, depth_max, limit, accepts)


def run_metrics(doc: Mapping) -> Iterable[Metric]:
    yield CounterMetricFamily(
        "accept_watch_lost_events",
        "Per-connection event records lost (ring buffer full); per-worker counters stay exact",
        value=int(doc["lost_events"]),
    )
    yield CounterMetricFamily(
        "accept_watch_unattributed",
        "Accepted connections that could not be attributed to a process (0 when counts are exact)",
        value=int(doc["unattributed"]),
    )
    diag = CounterMetricFamily(
        "accept_watch_diagnostic", "In-kernel diagnostic counters (see records.Counter)", labels=["counter"]
    )
    for name, value in sorted(doc["diagnostics"].items()):
        diag.add_metric([str(name)], int(value))
    yield diag
    info = GaugeMetricFamily(
        "accept_watch_info",
        "Constant 1; labels describe the traced server and the probe in use",
        labels=["master_pid", "probe", "kernel", "tool_version"],
    )
    info.add_metric(
        [str(int(doc["master_pid"])), str(doc["probe"]), str(doc["kernel"]), str(doc["tool_version"])], 1
    )
    yield info
    yield GaugeMetricFamily(
        "accept_watch_duration_seconds", "Time since tracing started", value=float(doc["duration_s"])
    )


def make_registry(snapshot: Callable[[], Mapping]) -> CollectorRegistry:
    # auto_describe=False: registering must not call collect() (that would take a snapshot at startup).
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return registry
