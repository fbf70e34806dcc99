"""The loss and degradation counters of /metrics: one metric per kind of loss (or a `reason` label
within one kind), never one catch-all counter mixing unrelated things.

Every in-kernel diagnostic slot (probes/records.py DiagCounter) maps to exactly one (metric, reason) here;
tests/test_metrics_names.py checks that none is left out, so a new slot cannot silently go unexported.
Every series is always present (0 when nothing was lost), so `increase()` alerts work from the start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

# metric name (without _total) -> (help, {reason label value: document diagnostics key}); a kind with a
# single cause has one entry whose reason is "" (no reason label).
LOSS_METRICS: dict[str, tuple[str, dict[str, str]]] = {
    "accept_watch_unattributed_accepts": (
        "Accepted connections that could not be attributed to a process (exactness is broken if > 0)",
        {"stats_map_full": "stats_map_full", "fd_walk_failed": "fd_walk_failed"},
    ),
    "accept_watch_lost_events": (
        "Per-connection event records lost because the ring buffer was full (per-worker counts stay exact)",
        {"": "events_lost"},
    ),
    "accept_watch_queue_wait_unmeasured": (
        "Accepts counted without a queue-wait sample, by reason",
        {"hist_map_full": "hist_map_full", "stamp_implausible": "wait_unknown",
         "conns_map_full": "conns_map_full"},
    ),
    "accept_watch_unknown_listener_accepts": (
        "Accepts counted per worker whose listening socket was not identified (not in per-listener counts)",
        {"": "listener_unknown"},
    ),
    "accept_watch_untracked_forks": (
        "Forked children that could not be added to the kernel's tracked set (map full)",
        {"": "tracked_map_full"},
    ),
    "accept_watch_lost_transitions": (
        "Worker-to-worker accept transitions not recorded (map full)",
        {"": "transitions_map_full"},
    ),
    "accept_watch_backstop_accepts": (
        "Accepts counted by the syscall-exit backstop because the main probe missed them (counted, not lost)",
        {"": "backstop_accepts"},
    ),
    "accept_watch_non_inet_accepts": (
        "Accepts of non-TCP/IP sockets (e.g. unix) by tracked processes, ignored by design",
        {"": "non_inet"},
    ),
    "accept_watch_listener_map_full_accepts": (
        "Accepts not counted per listener because the listener map was full (per-worker counts stay exact)",
        {"": "listeners_map_full"},
    ),
    "accept_watch_queue_wait_in_handshake": (
        "Accepts taken while the handshake was still finishing on another CPU: queue wait counted as 0 "
        "(not a loss)",
        {"": "wait_in_handshake"},
    ),
    "accept_watch_evicted_workers": (
        "Exited workers whose records were folded into the exited aggregate (bounded memory)",
        {"": "evicted_workers"},
    ),
}


def _count(diagnostics: Mapping[str, Any], key: str) -> float:
    value = diagnostics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return 0.0  # absent/garbage: the series stays (an alert on increase() must see it), at 0
    return float(value)


def loss_metrics(doc: Mapping, server: str) -> Iterable[Metric]:
    diagnostics = doc.get("diagnostics")
    diag: Mapping[str, Any] = diagnostics if isinstance(diagnostics, Mapping) else {}
    for name, (help_text, reasons) in LOSS_METRICS.items():
        labelled = any(reasons)
        family = CounterMetricFamily(name, help_text, labels=["server", "reason"] if labelled else ["server"])
        for reason, key in reasons.items():
            family.add_metric([server, reason] if labelled else [server], _count(diag, key))
        yield family
    export_errors = doc.get("export_errors")
    failures = export_errors.get("count") if isinstance(export_errors, Mapping) else None
    yield _single_counter(
        "accept_watch_export_failures",
        "Failed writes of the --export file (each is retried at the next period; the run goes on)",
        server, _count({"n": failures}, "n"),
    )


def _single_counter(name: str, help_text: str, server: str, value: float) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=["server"])
    family.add_metric([server], value)
    return family
