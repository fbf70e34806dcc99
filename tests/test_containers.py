"""Containers in both directions, with real podman (issue 13 item 5).

(a) a real gunicorn (Debian's python3-gunicorn, the pid app) in a podman container built from a
    debootstrapped Debian root, accept-watch on the host: counts exact against the app's own log, whose
    pids are the workers' pids inside the container, i.e. the document's `nspid`; each worker names
    the container.
(b) the accept-watch image (Debian packages + the wheel of this tree), run exactly as
    scripts/containers/container_recipe.py (and the README) says, counts a host gunicorn exactly and
    serves /metrics on the host's network; each host mount of the recipe is shown to be needed.

The images are built once and cached (scripts/containers/container_build.py); the first build takes
about three minutes.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from accept_watch.daemon.terminal import render
from accept_watch.dashboard.metrics import document_metrics
from accept_watch.dashboard.schema import Snapshot
from tests.podman import build, podman, podman_unavailable_reason, recipe, start_gunicorn_in_container
from tests.servers import count_by_pid, read_records, run_clients, start_gunicorn
from tests.watcher import free_port, start_watch

pytestmark = [pytest.mark.kernel, pytest.mark.containers]
N = 300


@pytest.fixture(scope="module")
def images(request: pytest.FixtureRequest) -> dict[str, str]:
    reason = podman_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return {"watch": build.ensure_image(), "server": build.ensure_testserver()}


@pytest.mark.parametrize("host_ns", [False, True], ids=["own-pid-and-net-namespaces", "host-pid-and-net"])
def test_gunicorn_in_container_counted_from_host(images: dict[str, str], tmp_path: Path,
                                                 host_ns: bool) -> None:
    """Own namespaces: a published port, the listener read in the container's network namespace
    (nsenter + ss), the workers' pids inside the container in the app's log."""
    srv = start_gunicorn_in_container(images["server"], tmp_path / "srv", workers=4, host_ns=host_ns)
    try:
        run = start_watch(srv.host_master_pid, tmp_path)
        try:
            result = run_clients(srv.port, N, concurrency=4)
        finally:
            rc = run.stop()
        assert rc == 0, run.stderr()
        doc = run.document()
    finally:
        srv.stop()
    truth = count_by_pid(read_records(srv.record_dir))  # pids as the workers see them
    assert (result.ok, result.failed) == (N, 0), result.errors[:3]
    assert sum(truth.values()) == N
    assert (doc["total_accepts"], doc["unattributed"]) == (N, 0)
    Snapshot.model_validate(doc)  # the new fields as the published schema describes them

    by_host_pid = {w["pid"]: w for w in doc["workers"]}
    master = by_host_pid[srv.host_master_pid]
    for w in doc["workers"]:
        assert w["container"]["id"] == srv.container_id, w
        assert w["container"]["runtime"] == "podman"
        assert srv.container_id in w["container"]["cgroup"]
    counted = {w["pid"]: w["accepts"] for w in doc["workers"] if w["accepts"]}
    (listener,) = doc["listeners"]
    assert listener["port"] == (srv.port if host_ns else 8000) and listener["accepts"] == N
    if host_ns:
        # Same pid namespace: no nspid, and the log's pids are the host's.
        assert all("nspid" not in w for w in doc["workers"])
        assert counted == truth
        return
    assert master["nspid"] == 1  # gunicorn is the container's first process
    assert all(w["nspid"] != w["pid"] for w in doc["workers"])
    assert {w["nspid"]: w["accepts"] for w in doc["workers"] if w["accepts"]} == truth
    assert len({w["nspid"] for w in doc["workers"]}) == len(doc["workers"])

    # Shown next to the host pid: terminal view, and the info series of /metrics.
    table = render(doc, width=140)
    assert f"container podman {srv.container_id[:12]}" in table and "ns pid" in table
    line = next(ln for ln in table.splitlines() if ln.split()[:1] == [str(srv.host_master_pid)])
    assert line.split()[1] == "1"
    info = next(m for m in document_metrics(doc) if m.name == "accept_watch_worker_container_info")
    live = [w for w in doc["workers"] if w["alive"] and w["role"] == "worker"]
    assert {(s.labels["pid"], s.labels["nspid"], s.labels["container"]) for s in info.samples} == {
        (str(w["pid"]), str(w["nspid"]), srv.container_id[:12]) for w in live}


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"podman run exited {proc.returncode}: {path.read_text()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen within {timeout}s: {path.read_text()[-3000:]}")


def test_image_counts_host_gunicorn(images: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    name = f"aw-watch-{uuid.uuid4().hex[:12]}"
    web = f"127.0.0.1:{free_port()}"
    with start_gunicorn(workers=4) as srv:
        cmd = recipe.podman_run_args("--pid", str(srv.master_pid), "--export", "/out/x.json", "--quiet",
                                     "--listen", web, extra_mounts=((str(out), "/out"),))
        assert cmd[:3] == ["podman", "run", "--rm"]
        cmd[3:3] = ["--name", name]
        err = tmp_path / "stderr"
        with open(err, "w") as f:
            proc = subprocess.Popen(cmd, env=build.podman_env(), stdout=subprocess.DEVNULL, stderr=f)
        try:
            _wait_for(err, "attached in", proc, 120)
            result = run_clients(srv.port, N, concurrency=4)
            # The dashboard is on the host's network (--net=host): its /metrics is the document's.
            deadline = time.monotonic() + 10
            while True:
                metrics = httpx.get(f"http://{web}/metrics", timeout=5).text
                if f"accept_watch_accepts_total{{server=\"gunicorn:{srv.port}\"}} {N}.0" in metrics:
                    break
                assert time.monotonic() < deadline, metrics[-2000:]
                time.sleep(0.5)
            podman("kill", "--signal", "INT", name)
            assert proc.wait(timeout=60) == 0, err.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                podman("rm", "-f", "-t", "0", name, check=False)
                proc.wait(timeout=30)
        truth = srv.ground_truth()
    doc = json.loads((out / "x.json").read_text())
    assert (result.ok, result.failed) == (N, 0)
    assert sum(truth.values()) == N
    assert (doc["total_accepts"], doc["unattributed"]) == (N, 0)
    assert {w["pid"]: w["accepts"] for w in doc["workers"] if w["accepts"]} == truth
    # accept-watch in its container, the server on the host: no worker is in a container.
    assert all("container" not in w and "nspid" not in w for w in doc["workers"])
    assert doc["probe"] == "tracepoint" or doc["probe"] in ("fexit", "kretprobe")


def _doctor(mounts: tuple[recipe.Mount, ...]) -> str:
    cmd = recipe.podman_run_args("doctor", mounts=mounts)
    proc = subprocess.run(cmd, env=build.podman_env(), capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def test_each_recipe_mount_is_needed(images: dict[str, str]) -> None:
    """With every mount the image's doctor finds headers and attaches a probe; without any one of them
    BCC has no headers to compile against (tracefs, debugfs and BTF need no mount: accept-watch mounts
    the first two itself, BTF is in the container's own sysfs)."""
    full = _doctor(recipe.MOUNTS)
    assert "[ok  ] kernel headers" in full and "[ok  ] BTF " in full, full
    assert "[ok  ] auto would use" in full, full
    for m in recipe.MOUNTS:
        text = _doctor(tuple(x for x in recipe.MOUNTS if x != m))
        assert "[FAIL] kernel headers" in text, (m.host, text)


def test_image_contents(images: dict[str, str]) -> None:
    """Debian's packages (BCC, psutil, Python) and accept-watch from the wheel (not the repository)."""
    q = podman("run", "--rm", "--entrypoint", "dpkg-query", images["watch"], "-W", "-f",
               "${Package} ${Status}\\n", *recipe.IMAGE_DEBS)
    for pkg in recipe.IMAGE_DEBS:
        assert f"{pkg} install ok installed" in q.stdout, q.stdout
    py = podman("run", "--rm", "--entrypoint", f"{recipe.VENV}/bin/python", images["watch"], "-c",
                "import accept_watch, bcc, importlib.metadata as m; "
                "print(accept_watch.__file__, bcc.__file__, m.version('accept-watch'))")
    mod, bcc_path, version = py.stdout.split()
    assert mod.startswith(f"{recipe.VENV}/lib/") and "site-packages/accept_watch/" in mod
    assert bcc_path.startswith("/usr/lib/python3/dist-packages/bcc/")
    assert f":{version}" in recipe.IMAGE
