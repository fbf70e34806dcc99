"""Prometheus exposition built from the snapshot document at scrape time.

A custom Collector (rather than long-lived Counter/Gauge objects) keeps /metrics a pure function of
the same document /api/snapshot serves, so both can never disagree and nothing needs updating between
scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

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


def _num(value: Any) -> float | None:
    """A finite number, or None for null/unknown/garbage: such a sample is left out, never a 500."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _add(family: Metric, labels: list[str], value: Any) -> None:
    v = _num(value)
    if v is not None:
        family.add_metric(labels, v)


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
        if not isinstance(entry, list | tuple) or len(entry) != 3 or any(_num(x) is None for x in entry):
            continue  # not [low_ns, high_ns, count]: nothing to count
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
        yield from export_metrics(doc)


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
    for w in _list(doc.get("workers")):
        if not isinstance(w, Mapping) or _num(w.get("pid")) is None:
            continue
        pid = str(int(w["pid"]))
        _add(accepts, [pid], w.get("accepts"))
        if isinstance(w.get("alive"), bool):
            alive.add_metric([pid], 1 if w["alive"] else 0)
        _add(share, [pid], w.get("share"))
        buckets, total = cumulative_buckets(_list(w.get("queue_wait_hist")))
        mean_us, count = _num(_get(w, "queue_wait_us", "mean")), _num(_get(w, "queue_wait_us", "count"))
        # The exact sum (mean * count) comes from the kernel's running sum, not from bucket midpoints.
        wait_sum = 0.0 if not total or mean_us is None or count is None else mean_us * 1e-6 * count
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
    for listener in _list(doc.get("listeners")):
        if not isinstance(listener, Mapping):
            continue
        # A listener that has not accepted yet has no known queue limit (null): its sample is left out.
        key = [str(listener.get("address")), _label(listener.get("port")), _label(listener.get("inode"))]
        _add(depth, key, _get(listener, "queue_depth", "current"))
        _add(depth_max, key, _get(listener, "queue_depth", "max"))
        _add(limit, key, _get(listener, "queue_depth", "limit"))
        _add(accepts, key, listener.get("accepts"))
    yield from (depth, depth_max, limit, accepts)


def _label(value: Any) -> str:
    v = _num(value)
    return "" if v is None else str(int(v))


def _single(family: Metric, value: Any) -> Iterable[Metric]:
    _add(family, [], value)
    yield family


def run_metrics(doc: Mapping) -> Iterable[Metric]:
    yield from _single(CounterMetricFamily(
        "accept_watch_lost_events",
        "Per-connection event records lost (ring buffer full); per-worker counters stay exact",
    ), doc.get("lost_events"))
    yield from _single(CounterMetricFamily(
        "accept_watch_unattributed",
        "Accepted connections that could not be attributed to a process (0 when counts are exact)",
    ), doc.get("unattributed"))
    diag = CounterMetricFamily(
        "accept_watch_diagnostic", "In-kernel diagnostic counters (see records.Counter)", labels=["counter"]
    )
    diagnostics = doc.get("diagnostics")
    for name, value in sorted((diagnostics if isinstance(diagnostics, Mapping) else {}).items()):
        _add(diag, [str(name)], value)
    yield diag
    info = GaugeMetricFamily(
        "accept_watch_info",
        "Constant 1; labels describe the traced server and the probe in use",
        labels=["master_pid", "probe", "kernel", "tool_version"],
    )
    info.add_metric(
        [_label(doc.get("master_pid")), str(doc.get("probe")), str(doc.get("kernel")),
         str(doc.get("tool_version"))], 1
    )
    yield info
    duration = GaugeMetricFamily("accept_watch_duration_seconds", "Time since tracing started")
    yield from _single(duration, doc.get("duration_s"))


def export_metrics(doc: Mapping) -> Iterable[Metric]:
    # Always present (0 without --export or without failures), so an alert on increase() just works.
    yield CounterMetricFamily(
        "accept_watch_export_failures",
        "Failed writes of the --export file (each is retried at the next period; the run goes on)",
        value=_num(_get(doc, "export_errors", "count")) or 0,
    )


def make_registry(snapshot: Callable[[], Mapping]) -> CollectorRegistry:
    # auto_describe=False: registering must not call collect() (that would take a snapshot at startup).
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return registry
