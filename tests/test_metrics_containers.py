"""accept_watch_worker_container_info: one series per live worker in a container, labels validated
again (the document may come from elsewhere), nothing for anything else."""

from __future__ import annotations

from accept_watch.dashboard.metrics import document_metrics

CID = "027e9aa020aba677187a546cfc729090806bab65d6a5db6c74ee6fb7b2cc5aef"


def _w(pid: int, **kw: object) -> dict:
    return {"pid": pid, "role": "worker", "alive": True, "accepts": 1, "share": 0.25, **kw}


def _info(workers: list[dict]) -> list[dict[str, str]]:
    doc = {"master_pid": 10, "master_cmdline": "gunicorn: master", "workers": workers, "listeners": []}
    (fam,) = [m for m in document_metrics(doc, "web") if m.name == "accept_watch_worker_container_info"]
    assert all(s.value == 1 for s in fam.samples)
    return [s.labels for s in fam.samples]


def test_one_series_per_live_worker_in_a_container() -> None:
    c = {"id": CID, "runtime": "podman", "cgroup": "/libpod_parent/libpod-" + CID}
    labels = _info([
        _w(11, nspid=2, container=c),
        _w(12, container=c),  # same pid namespace as the host
        _w(13, nspid=4, container=c, alive=False),  # exited: no series (cardinality = live workers)
        _w(14),  # not in a container
        {**_w(10, nspid=1, container=c), "role": "master", "accepts": 0},  # a master that never accepted
    ])
    assert labels == [
        {"server": "web", "pid": "11", "nspid": "2", "container": CID[:12], "runtime": "podman"},
        {"server": "web", "pid": "12", "nspid": "", "container": CID[:12], "runtime": "podman"},
    ]


def test_bad_container_fields_make_no_series() -> None:
    bad = [
        {"id": "not-hex\x1b[2J", "runtime": "podman"},
        {"id": CID, "runtime": "rkt\n"},
        {"id": CID[:8], "runtime": "docker"},
        "podman",
        {"runtime": "podman"},
    ]
    assert _info([_w(20 + i, nspid=True, container=c) for i, c in enumerate(bad)]) == []
    (ok,) = _info([_w(30, nspid=True, container={"id": CID, "runtime": "docker"})])
    assert ok["nspid"] == ""  # a bool is not a pid
