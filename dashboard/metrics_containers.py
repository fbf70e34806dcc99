"""Which container each live worker runs in, as one info series per worker: join it onto any
per-worker series with `* on(server, pid) group_left(container, runtime, nspid)`.

A separate info metric rather than extra labels on the counters: the counters' label sets stay what
dashboards and alert rules already use, and a worker's container cannot change while it lives.
Cardinality is that of the worker series (live workers only); the container label is the 12-digit
short id, the runtime one of a fixed vocabulary (both validated again here: the document may come from
elsewhere).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

_ID = re.compile(r"[0-9a-f]{12,64}\Z")
RUNTIMES = frozenset({"podman", "docker", "containerd", "cri-o", "kubernetes"})


def container_metrics(workers: Iterable[Mapping[str, Any]], server: str,
                      live: Any) -> Iterable[Metric]:
    """live: the predicate the per-worker series use (so both have the same pids)."""
    info = GaugeMetricFamily(
        "accept_watch_worker_container_info",
        "The container of each live worker in one (short id, runtime, pid inside the container): 1",
        labels=["server", "pid", "nspid", "container", "runtime"])
    for w in workers:
        c = w.get("container")
        if not live(w) or not isinstance(c, Mapping):
            continue
        cid, runtime = c.get("id"), c.get("runtime")
        if not (isinstance(cid, str) and _ID.match(cid) and runtime in RUNTIMES):
            continue
        ns = w.get("nspid")
        nspid = str(ns) if isinstance(ns, int) and not isinstance(ns, bool) and ns > 0 else ""
        info.add_metric([server, str(int(w["pid"])), nspid, cid[:12], str(runtime)], 1)
    yield info
