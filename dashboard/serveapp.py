"""The HTTP side of `accept-watch serve`: /metrics for every target, a small JSON API, /healthz.

Same rules as the session dashboard (dashboard/guard.py): GET/HEAD only, Host checked on loopback, a
token on every route but /healthz for any other address. /metrics merges each target's families (built
by metrics.document_metrics from the target's own document, with its `server` label) into one family
per name, so the exposition has one HELP/TYPE per metric; process_* once, for accept-watch itself.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterable
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, HTTPException, Path
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from accept_watch.dashboard.guard import RequestGuard, check_token, normalise_hosts
from accept_watch.dashboard.limits import ConnectionLimits
from accept_watch.dashboard.metrics import document_metrics
from accept_watch.dashboard.metrics_losses import LOSS_METRICS


class ServeSource(Protocol):
    def target_list(self) -> list[dict[str, Any]]: ...  # one summary per target
    def document(self, name: str) -> dict[str, Any] | None: ...  # a target's accept-watch/1 document
    def metric_documents(self) -> list[tuple[str, bool, dict[str, Any] | None]]: ...  # (server, up, doc)
    def daemon_counters(self) -> dict[str, float]: ...  # the daemon's own counters (see daemon_metrics)


def daemon_metrics(source: ServeSource,
                   targets: list[tuple[str, bool, dict[str, Any] | None]]) -> list[Metric]:
    up = GaugeMetricFamily("accept_watch_target_up",
                           "1 while a process serves the target, 0 while it is down (kept, looked for again)",
                           labels=["server"])
    for server, is_up, _doc in targets:
        up.add_metric([server], 1 if is_up else 0)
    c = source.daemon_counters()
    pruned = CounterMetricFamily("accept_watch_pruned_workers",
                                 "Exited workers whose kernel counters were deleted after the retention time "
                                 "(their accepts stay in pid=\"exited\")")
    pruned.add_metric([], c.get("pruned_workers", 0))
    pruned_l = CounterMetricFamily("accept_watch_pruned_listeners",
                                   "Closed listening sockets whose kernel counters were deleted after the "
                                   "retention time (their figures stay in the target's document)")
    pruned_l.add_metric([], c.get("pruned_listeners", 0))
    entries = GaugeMetricFamily("accept_watch_kernel_listener_entries",
                                "Listening sockets in the kernel's per-listener map at the last read "
                                "(closed ones leave it after the retention time)")
    entries.add_metric([], c.get("kernel_listener_entries", 0))
    refused = CounterMetricFamily("accept_watch_refused_targets",
                                  "Servers not watched because the target cap (max_targets) was reached")
    refused.add_metric([], c.get("refused_targets", 0))
    unowned = CounterMetricFamily("accept_watch_unowned_workers",
                                  "Processes the kernel counted that no target could be given (their accepts "
                                  "are in no target's figures)")
    unowned.add_metric([], c.get("unowned_workers", 0))
    return [up, pruned, pruned_l, entries, refused, unowned]


# The in-kernel loss counters come from one per-CPU array of the one set of BPF programs every target
# shares, with no key: an accept that could not be attributed, a ring-buffer record lost, a map that
# was full, does not say which target it belonged to (that is what was lost). serve cannot split them
# and does not: each target's series is the daemon-wide total. evicted_workers is per target (user space).
DAEMON_WIDE = frozenset(name for name in LOSS_METRICS if name != "accept_watch_evicted_workers")
SERVE_DAEMON_WIDE = (". accept-watch serve: daemon-wide (one set of BPF maps for every target, whose "
                     "kernel counter does not say which target): the same total under every server label; "
                     "do not sum across servers")


def merged(families: Iterable[Metric]) -> list[Metric]:
    """One family per name, samples in the order they came (targets in order)."""
    out: dict[str, Metric] = {}
    for fam in families:
        have = out.get(fam.name)
        if have is None:
            out[fam.name] = fam
        else:
            have.samples.extend(fam.samples)
    return list(out.values())


class ServeCollector(Collector):
    def __init__(self, source: ServeSource) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        targets = self._source.metric_documents()
        families: list[Metric] = []
        for server, _up, doc in targets:
            if doc is not None:  # a target never seen up has no document yet: only target_up
                families.extend(document_metrics(doc, server))
        out = merged([*families, *daemon_metrics(self._source, targets)])
        for fam in out:
            if fam.name in DAEMON_WIDE:
                fam.documentation += SERVE_DAEMON_WIDE
        return out


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def create_serve_app(source: ServeSource, *, token: str | None, allowed_hosts: Collection[str],
                     stream_interval: float = 1.0, limits: ConnectionLimits | None = None) -> FastAPI:
    """The signature of dashboard.app.create_app, so DashboardServer can run either."""
    del stream_interval, limits  # no streams here
    if token is not None:
        check_token(token)
    hosts = normalise_hosts(allowed_hosts, token)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServeCollector(source))
    ProcessCollector(registry=registry)
    app = FastAPI(title="accept-watch serve", version="1", docs_url=None, redoc_url=None,
                  description="Read-only: every watched server's accept distribution.")
    app.state.stopping = threading.Event()

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        """Prometheus text exposition: every target, `server` label."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/targets", response_class=Response)
    def targets() -> Response:
        """One summary per target (up or down)."""
        return Response(_dumps({"targets": source.target_list()}), media_type="application/json")

    @app.get("/api/targets/{name}", response_class=Response)
    def target(name: Annotated[str, Path(max_length=64)]) -> Response:
        """A target's accept-watch/1 document (404: no such target, or never seen up)."""
        doc = source.document(name)
        if doc is None:
            raise HTTPException(404, "no such target, or it has not been seen running yet")
        return Response(_dumps(doc), media_type="application/json")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness probe; needs no token."""
        return {"status": "ok"}

    for path, handler in (("/metrics", metrics), ("/api/targets", targets), ("/api/targets/{name}", target),
                          ("/healthz", healthz)):
        app.add_api_route(path, handler, methods=["HEAD"], include_in_schema=False)
    app.add_middleware(RequestGuard, token=token, allowed_hosts=hosts)
    return app
