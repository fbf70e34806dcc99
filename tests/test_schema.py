"""Documents from the real aggregator (daemon/stats.py) validate against the published model
(daemon/document.py, from which the OpenAPI schema is generated), including the null and unknown
cases, and round-trip through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accept_watch.daemon.discovery import Listener, ProcessInfo, Topology
from accept_watch.daemon.document import Document as Snapshot
from accept_watch.daemon.document import DocumentError
from accept_watch.daemon.stats import Aggregator
from accept_watch.probes.records import DiagCounter, KernelSnapshot, ListenerCounters, WorkerCounters
from tests.reportsim import simulate

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
        {(80, 0, 2): 1, (80, 2, 2): 4, (82, 0, 3): 1}, {c: 0 for c in DiagCounter},
    )
    agg.update(snap, topo, {10: 0})
    doc = agg.document(ended=True)
    kernel_only = [lst for lst in doc["listeners"] if lst["inode"] == 12]
    assert kernel_only and kernel_only[0]["family"] is None and kernel_only[0]["mode"] == "unknown"
    assert next(lst for lst in doc["listeners"] if lst["inode"] == 11)["queue_depth"]["limit"] is None
    Snapshot.model_validate(doc)
    assert Snapshot.model_validate(json.loads(json.dumps(doc))).total_accepts == 6  # round trip


def test_exports_round_trip_through_the_model() -> None:
    """What the aggregator builds, analysed, is exactly what loading it back gives (keys, values)."""
    from accept_watch.daemon import analysis
    from accept_watch.daemon.document import Document

    raw = json.loads(REAL_EXPORT.read_text())
    assert Document.from_dict(raw).to_dict() == raw
    doc = simulate(pattern="lifo", seconds=8)
    assert Document.from_dict(json.loads(json.dumps(doc))).to_dict() == doc
    model = analysis.analyzed(Document.from_dict(doc))
    assert model.analysis.verdict is not None and model.analysis.competitors is not None
    again = Document.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.to_dict() == model.to_dict()


def test_a_worker_may_carry_container_fields() -> None:
    raw = json.loads(REAL_EXPORT.read_text())
    cid = "0123456789ab" * 2
    raw["workers"][0] |= {"nspid": 7, "container": {"id": cid, "runtime": "docker", "cgroup": "/x"},
                          "later": [1]}
    out = Snapshot.from_dict(raw).to_dict()["workers"][0]
    assert out["nspid"] == 7 and out["container"]["id"] == cid and out["later"] == [1]
    # The id is an untrusted string from a cgroup path: only hex ids are a container's.
    raw["workers"][0]["container"]["id"] = "abc"
    with pytest.raises(DocumentError, match=r"workers\[0\]\.container\.id"):
        Snapshot.from_dict(raw)



@pytest.mark.parametrize("pattern", ["fifo", "idle"])
def test_the_aggregators_dict_is_the_models_dump(pattern: str) -> None:
    """Aggregator.model() keeps its build as the document's dict form, and analyzed() reuses it: both
    must be exactly what dumping the model gives."""
    from accept_watch.daemon import analysis
    from accept_watch.daemon.document import Document

    doc = simulate(pattern=pattern, seconds=8)
    model = Document.from_dict(doc)
    fresh = Document.of_json_dict(json.loads(json.dumps(doc)))
    dump = fresh.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert fresh.to_dict() == dump == model.to_dict()
    assert json.dumps(fresh.to_dict()) == json.dumps(dump)  # same keys in the same order, same types
    done = analysis.analyzed(fresh)
    assert done.to_dict() == done.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert json.dumps(done.to_dict()) == json.dumps(done.model_dump(mode="json", by_alias=True,
                                                                    exclude_unset=True))
