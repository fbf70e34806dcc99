"""Prometheus exposition built from the snapshot document at scrape time.

A custom Collector (rather than long-lived Counter/Gauge objects) keeps /metrics a pure function of
the same document /api/snapshot serves, so both can never disagree and nothing needs updating between
scrapes. Names follow Prometheus conventions (base units, `_total` counters, `_ratio` for 0-1 values);
every server metric carries a `server` label (see server_name()); README "Prometheus and Grafana" lists
them with their cardinality bounds.

Cardinality: per-worker series exist for live workers only; every exited worker's accepts are summed
into one pid="exited" series (so sum over pid stays the exact total and never goes down), and the daemon
itself folds exited workers away after a bounded count (stats.py max_exited). Listener series exist
for open listening sockets only (at most stats.MAX_LISTENERS).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from accept_watch.daemon.analysis import may_compete

from .metrics_containers import container_metrics
from .metrics_losses import loss_metrics

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


SERVER_NAME_MAX = 64
EXITED = "exited"  # the pid label of the exited-workers aggregate
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]+")
_INTERPRETERS = re.compile(r"^(python[0-9.]*|pypy[0-9.]*|ruby[0-9.]*|node|java|perl[0-9.]*|php[0-9.]*)$")


def server_name(doc: Mapping, override: Any = None) -> str:
    """The `server` label: `override` (a function argument), else the document's own "server" field,
    else the master's command name and its lowest listening port ("gunicorn:8000"), stable across
    restarts of the server (a pid would not be). Sanitized to [A-Za-z0-9_.:-] and at most 64 characters."""
    for given in (override, doc.get("server")):
        if isinstance(given, str) and (clean := _sanitize(given)):
            return clean
    ports = sorted({int(p) for lst in _list(doc.get("listeners")) if isinstance(lst, Mapping)
                    and (p := _num(lst.get("port"))) is not None and 0 < p < 65536})
    command = _command_name(doc.get("master_cmdline"))
    if not command:
        pid = _num(doc.get("master_pid"))
        command = f"pid{int(pid)}" if pid is not None else "unknown"
    return _sanitize(f"{command}:{ports[0]}" if ports else command) or "unknown"


def _sanitize(text: str) -> str:
    return _UNSAFE.sub("_", text[: SERVER_NAME_MAX * 4]).strip("_")[:SERVER_NAME_MAX]


def _command_name(cmdline: Any) -> str:
    """'gunicorn' from 'gunicorn: master [app]', '/usr/bin/python3 -m gunicorn ...' or
    '/x/bin/gunicorn app:app'; 'nginx' from 'nginx: master process ...'."""
    if not isinstance(cmdline, str):
        return ""
    words = cmdline[:4096].split()
    while words:
        base = os.path.basename(words[0]).rstrip(":")
        if _INTERPRETERS.match(base):
            words = words[1:]
            while words and words[0].startswith("-"):  # interpreter options; -m names the module next
                words = words[1:]
            continue
        return _sanitize(base)
    return ""


class SnapshotCollector(Collector):
    """Collects accept_watch_* metrics from `snapshot()` on every scrape."""

    def __init__(self, snapshot: Callable[[], Mapping], server: str | None = None) -> None:
        self._snapshot = snapshot
        self._server = server

    def describe(self) -> list[Metric]:
        # Nothing up front: describing would mean taking a snapshot at registration time.
        return []

    def collect(self) -> Iterable[Metric]:
        doc = self._snapshot()
        yield from document_metrics(doc if isinstance(doc, Mapping) else {}, self._server)


def document_metrics(doc: Mapping, server: str | None = None) -> Iterable[Metric]:
    name = server_name(doc, server)
    yield from worker_metrics(doc, name)
    yield from fairness_metrics(doc, name)
    yield from listener_metrics(doc, name)
    yield from run_metrics(doc, name)
    yield from loss_metrics(doc, name)


def _workers(doc: Mapping) -> list[Mapping]:
    return [w for w in _list(doc.get("workers")) if isinstance(w, Mapping) and _num(w.get("pid")) is not None]


def _live(w: Mapping) -> bool:
    """A live process that accepts or is a worker (a master that never accepted gets no series).
    The analysis' who-competes rule, live processes only: this decides which pids get a series (exited
    ones are summed under pid="exited", so labels stay bounded), not the fair share, which falls back
    to every worker once none is alive (analysis.competing_pids)."""
    return w.get("alive") is True and may_compete(w)


def worker_metrics(doc: Mapping, server: str) -> Iterable[Metric]:
    accepts = CounterMetricFamily(
        "accept_watch_worker_accepts",
        f"Connections accepted by each live process (all listening ports); pid=\"{EXITED}\" sums every "
        "exited one", labels=["server", "pid"],
    )
    share = GaugeMetricFamily(
        "accept_watch_worker_share_ratio",
        "Fraction of all connections accepted since start taken by each live worker",
        labels=["server", "pid"],
    )
    workers = _workers(doc)
    exited = _num(doc.get("diagnostics", {}).get("evicted_accepts")
                  if isinstance(doc.get("diagnostics"), Mapping) else None) or 0.0
    for w in workers:
        if _live(w):
            pid = str(int(w["pid"]))
            _add(accepts, [server, pid], w.get("accepts"))
            _add(share, [server, pid], w.get("share"))
        else:
            exited += _num(w.get("accepts")) or 0.0
    accepts.add_metric([server, EXITED], exited)
    yield from (accepts, share)
    yield from _single(GaugeMetricFamily(
        "accept_watch_live_workers", "Live workers (and any other live process that has accepted)",
        labels=["server"]), server, sum(1 for w in workers if _live(w)))
    yield from _single(CounterMetricFamily(
        "accept_watch_accepts", "Connections accepted by all the server's processes since start",
        labels=["server"]), server, doc.get("total_accepts"))
    yield queue_wait_histogram(doc, workers, server)
    yield from container_metrics(workers, server, _live)


def queue_wait_histogram(doc: Mapping, workers: list[Mapping], server: str) -> Metric:
    """One histogram per server over every worker, exited and evicted ones included, so it only grows."""
    wait = HistogramMetricFamily(
        "accept_watch_queue_wait_seconds",
        "Time from handshake completion to accept() return (time spent in the accept queue)",
        labels=["server"],
    )
    entries: list[Any] = []
    wait_sum = 0.0
    for w in workers:
        entries.extend(_list(w.get("queue_wait_hist")))
        mean_us, count = _num(_get(w, "queue_wait_us", "mean")), _num(_get(w, "queue_wait_us", "count"))
        # The exact sum (mean * count) comes from the kernel's running sum, not from bucket midpoints.
        if mean_us is not None and count is not None:
            wait_sum += mean_us * 1e-6 * count
    evicted = doc.get("evicted_queue_wait")
    if isinstance(evicted, Mapping):
        entries.extend(_list(evicted.get("hist")))
        wait_sum += (_num(evicted.get("sum_us")) or 0.0) * 1e-6
    buckets, total = cumulative_buckets(entries)
    wait.add_metric([server], buckets, wait_sum if total else 0.0)
    return wait


def fairness_metrics(doc: Mapping, server: str) -> Iterable[Metric]:
    """Each live worker's fair share (what an even draw among the workers live when each accept happened
    would give it) next to what it got, per port; the verdict as an info-style metric."""
    live = {str(int(w["pid"])) for w in _workers(doc) if _live(w)}
    fair = GaugeMetricFamily(
        "accept_watch_worker_fair_share_ratio",
        "Share of all accepts each live worker was owed by the number of workers live at each moment",
        labels=["server", "pid"],
    )
    by_pid = _get(doc, "analysis", "fairness", "fair_share_by_pid")
    for pid, value in sorted((by_pid if isinstance(by_pid, Mapping) else {}).items()):
        if str(pid) in live:
            _add(fair, [server, str(pid)], value)
    labels = ["server", "port", "pid"]
    owed = GaugeMetricFamily(
        "accept_watch_worker_fair_accepts",
        "Accepts each live worker was owed on the port since start (its fair share, integrated over time)",
        labels=labels,
    )
    got = CounterMetricFamily(
        "accept_watch_worker_port_accepts", "Accepts of each live worker on each port since start",
        labels=labels,
    )
    load = GaugeMetricFamily(
        "accept_watch_worker_fair_share_load_ratio",
        "Accepts taken over accepts owed since start, per live worker and port (1 = its fair share)",
        labels=labels,
    )
    shares = doc.get("fair_share")
    for port, entry in sorted((shares if isinstance(shares, Mapping) else {}).items()):
        if not isinstance(entry, Mapping) or _label(_num_str(port)) == "":
            continue
        expected, observed = entry.get("expected"), entry.get("observed")
        expected = expected if isinstance(expected, Mapping) else {}
        observed = observed if isinstance(observed, Mapping) else {}
        for pid in sorted(live & {str(p) for p in expected}):
            key = [server, _label(_num_str(port)), pid]
            e, o = _num(expected.get(pid)), _num(observed.get(pid, 0))
            _add(owed, key, e)
            _add(got, key, o)
            if e is not None and o is not None and e > 0:
                load.add_metric(key, o / e)
    yield from (fair, owed, got, load)
    yield verdict_metric(doc, server)


def verdict_metric(doc: Mapping, server: str) -> Metric:
    info = GaugeMetricFamily(
        "accept_watch_verdict_info",
        "Constant 1: the distribution pattern of each port and its cause (labels from fixed vocabularies)",
        labels=["server", "port", "pattern", "confidence", "cause"],
    )
    per_port = _get(doc, "analysis", "per_port")
    for port, verdict in sorted((per_port if isinstance(per_port, Mapping) else {}).items()):
        if isinstance(verdict, Mapping) and _label(_num_str(port)):
            info.add_metric([server, _label(_num_str(port)), _word(verdict.get("pattern")),
                             _word(verdict.get("confidence")), _word(verdict.get("cause"))], 1)
    return info


def _word(value: Any) -> str:
    """A vocabulary word as a label value: bounded and sanitized (the document is trusted, but a label
    must never be unbounded)."""
    return _sanitize(value.replace(" ", "_")) if isinstance(value, str) else ""


def _num_str(value: Any) -> float | None:
    if isinstance(value, str) and value.isdigit() and len(value) <= 5:
        return float(value)
    return _num(value)


def listener_metrics(doc: Mapping, server: str) -> Iterable[Metric]:
    labels = ["server", "address", "port", "inode"]
    depth = GaugeMetricFamily(
        "accept_watch_listen_queue_length", "Connections waiting in the accept queue (latest sample)",
        labels=labels,
    )
    depth_max = GaugeMetricFamily(
        "accept_watch_listen_queue_max_length", "Highest accept-queue length seen since start", labels=labels
    )
    limit = GaugeMetricFamily(
        "accept_watch_listen_queue_limit", "Accept-queue limit (the listen() backlog as applied)",
        labels=labels,
    )
    accepts = CounterMetricFamily(
        "accept_watch_listener_accepts", "Connections accepted from each listening socket", labels=labels
    )
    drops = CounterMetricFamily(
        "accept_watch_listen_drops",
        "SYNs and handshakes the listening socket dropped (full accept or SYN queue): its sk_drops",
        labels=labels,
    )
    for listener in _list(doc.get("listeners")):
        # Closed sockets are left out: their series end, so restarts do not pile up label sets.
        if not isinstance(listener, Mapping) or listener.get("open") is False:
            continue
        # A listener that has not accepted yet has no known queue limit (null): its sample is left out.
        key = [server, _sanitize(str(listener.get("address"))[:64]), _label(listener.get("port")),
               _label(listener.get("inode"))]
        _add(depth, key, _get(listener, "queue_depth", "current"))
        _add(depth_max, key, _get(listener, "queue_depth", "max"))
        _add(limit, key, _get(listener, "queue_depth", "limit"))
        _add(accepts, key, listener.get("accepts"))
        _add(drops, key, listener.get("drops"))
    yield from (depth, depth_max, limit, accepts, drops)


def _label(value: Any) -> str:
    v = _num(value)
    return "" if v is None else str(int(v))


def _single(family: Metric, server: str, value: Any) -> Iterable[Metric]:
    _add(family, [server], value)
    yield family


def _epoch(iso: Any) -> float | None:
    if not isinstance(iso, str) or len(iso) > 64:
        return None
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


def run_metrics(doc: Mapping, server: str) -> Iterable[Metric]:
    info = GaugeMetricFamily(
        "accept_watch_info",
        "Constant 1; labels describe the traced server and the probe in use",
        labels=["server", "master_pid", "probe", "kernel", "version"],
    )
    info.add_metric([server, _label(doc.get("master_pid")), _word(doc.get("probe")), _word(doc.get("kernel")),
                     _word(doc.get("tool_version"))], 1)
    yield info
    yield from _single(GaugeMetricFamily(
        "accept_watch_start_time_seconds", "When tracing started, seconds since the Unix epoch",
        labels=["server"]), server, _epoch(doc.get("started_at")))
    yield from _single(GaugeMetricFamily(
        "accept_watch_last_update_time_seconds", "When the kernel counters were last read (Unix epoch)",
        labels=["server"]), server, _epoch(doc.get("updated_at")))
    masters = [m for m in _list(doc.get("masters")) if isinstance(m, Mapping)]
    yield from _single(GaugeMetricFamily(
        "accept_watch_masters", "Master processes of the server seen since start (more than 1: restarted)",
        labels=["server"]), server, len(masters) if masters else None)


def make_registry(snapshot: Callable[[], Mapping], server: str | None = None) -> CollectorRegistry:
    """The /metrics registry: the snapshot's metrics (`server` overrides the label's default) and
    accept-watch's own process_* metrics (its CPU and memory are part of what it promises)."""
    # auto_describe=False: registering must not call collect() (that would take a snapshot at startup).
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot, server))
    ProcessCollector(registry=registry)
    return registry
