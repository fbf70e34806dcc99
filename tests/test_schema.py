"""Documents from the real aggregator (daemon/stats.py) validate against the published schema
(dashboard/schema.py, the OpenAPI contract), including the null and unknown cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accept_watch.daemon.discovery import Listener, ProcessInfo, Topology
from accept_watch.daemon.stats import Aggregator
from accept_watch.dashboard.schema import Snapshot
from accept_watch.probes.records import Counter, KernelSnapshot, ListenerCounters, WorkerCounters

from tests.test_report import simulate

REAL_EXPORT = Path(__file__).parent / "data" / "real_export.json"


@pytest.mark.parametrize("pattern", ["fifo", "lifo", "hash", "idle"])
def test_simulated_runs_of_the_real_aggregator_validate(pattern: str) -> None:
    Snapshot.model_validate(simulate(pattern=pattern, seconds=8))


def test_an_export_of_a_real_run_validates() -> None:
    Snapshot.model_validate(json.loads(REAL_EXPORT.read_text()))


def test_unknown_and_null_fields_validate() -> None:
    """A listener only the kernel saw (family and address unknown), another that never accepted (no
    queue limit yet), a worker only the kernel saw (no command line), before and after counts."""
    procs = {1: ProcessInfo(1, 0, "srv", 1.0, "master"), 2: ProcessInfo(2, 1, "w", 1.0, "worker")}
    topo = Topology(1, "srv", procs,
                    [Listener(10, "ipv4", "127.0.0.1", 80, [1, 2], "shared"),
                     Listener(11, "ipv6", "::1", 81, [1, 2], "shared")])
    clock = [1_000]
    agg = Aggregator(topo, "tracepoint", "", "k", mono_clock=lambda: clock[0], wall_clock=lambda: 10**18,
                     process_lookup=lambda pid: None)
    Snapshot.model_validate(agg.document())  # nothing counted yet
    clock[0] = 2_000_000_000
    snap = KernelSnapshot(
        clock[0],
        (WorkerCounters(2, 80, 5, 1_500, 1_900, 0, 0, 0), WorkerCounters(3, 82, 1, 1_600, 1_600, 0, 0, 0)),
        {}, (ListenerCounters(10, 80, 5, 1, 128), ListenerCounters(12, 82, 1, 0, 64)),
        {(80, 0, 2): 1, (80, 2, 2): 4, (82, 0, 3): 1}, {c: 0 for c in Counter},
    )
    agg.update(snap, topo, {10: 0})
    doc = agg.document(ended=True)
    kernel_only = [lst for lst in doc["listeners"] if lst["inode"] == 12]
    assert kernel_only and kernel_only[0]["family"] is None and kernel_only[0]["mode"] == "unknown"
    assert next(lst for lst in doc["listeners"] if lst["inode"] == 11)["queue_depth"]["limit"] is None
    Snapshot.model_validate(doc)
    assert Snapshot.model_validate(json.loads(json.dumps(doc))).total_accepts == 6  # round trip
