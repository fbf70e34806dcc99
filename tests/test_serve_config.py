"""`accept-watch serve` pure logic: target specifications, the TOML file, option merging, the cgroup path
rules for --unit, splitting one kernel snapshot per target, merging metric families; bad input through
the real CLI is one line and a non-zero exit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily

from accept_watch.daemon import serveopts, targets, targetspec, units
from accept_watch.daemon.targetspec import SpecError, TargetSpec
from accept_watch.dashboard.serveapp import merged
from accept_watch.probes.records import DiagCounter, KernelSnapshot, ListenerCounters, WorkerCounters
from tests.watcher import run_cli


def _cfg(tmp_path: Path, text: str) -> str:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return str(path)


def test_flags_with_and_without_names() -> None:
    assert targetspec.from_flag("pidfile", "web=/run/g.pid") == TargetSpec("pidfile", "/run/g.pid", "web")
    assert targetspec.from_flag("unit", "nginx") == TargetSpec("unit", "nginx.service", None)
    assert targetspec.from_flag("port", "8000") == TargetSpec("port", 8000, None)
    assert targetspec.from_flag("match", "^gunicorn: master").value == "^gunicorn: master"
    assert targetspec.derived_name(TargetSpec("pidfile", "/run/gunicorn.pid")) == "gunicorn"
    assert targetspec.derived_name(TargetSpec("unit", "nginx.service")) == "nginx"
    assert targetspec.derived_name(TargetSpec("port", 8000)) == "port:8000"
    assert targetspec.derived_name(TargetSpec("pid", 42)) is None  # named when found (command:port)


@pytest.mark.parametrize(("kind", "value", "message"), [
    ("pid", "0", "from 1"), ("pid", "abc", "whole number"), ("port", "70000", "from 1 to 65535"),
    ("pidfile", "relative.pid", "absolute path"), ("unit", "a/b", "not a systemd unit"),
    ("match", "(", "bad regex"), ("match", "x" * 300, "at most 256"),
])
def test_bad_flag_values(kind: str, value: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        targetspec.from_flag(kind, value)


def test_config_file(tmp_path: Path) -> None:
    path = _cfg(tmp_path, """
listen = "127.0.0.1:9300"
retention = 60
all = true

[[target]]
name = "web"
pidfile = "/run/gunicorn.pid"

[[target]]
unit = "nginx"

[[target]]
port = 8080
""")
    opts = serveopts.options_from_argv(["--config", path, "--match", "m=^uvicorn", "--retention", "30"])
    assert [(s.kind, s.value, s.name) for s in opts.specs] == [
        ("pidfile", "/run/gunicorn.pid", "web"), ("unit", "nginx.service", None), ("port", 8080, None),
        ("match", "^uvicorn", "m")]
    assert opts.listen == ("127.0.0.1", 9300) and opts.all is True
    assert opts.retention == 30.0  # the flag wins over the file


@pytest.mark.parametrize(("text", "message"), [
    ("listen = ", "Invalid value"),
    ("colour = 1", "unknown setting 'colour'"),
    ("interval = 'fast'", "interval must be int or float"),
    ("all = 1", "all must be bool"),
    ("[[target]]\npid = 1\nport = 2", "exactly one of"),
    ("[[target]]\nname = 'a b'\npid = 1", "target name"),
    ("[[target]]\nsocket = 1", "unknown key 'socket'"),
    ("[[target]]\nmatch = '('", "bad regex"),
    ("[[target]]\nport = 1\n[[target]]\nport = 1", "given twice"),
    ("[[target]]\nport = 1\nname = 'x'\n[[target]]\nport = 2\nname = 'x'", "two targets are named 'x'"),
    ("retention = 0.1\n[[target]]\nport = 1", "retention: must be a number from 1"),
    ("max_targets = 1\n[[target]]\nport = 1\n[[target]]\nport = 2", "more than max_targets"),
    ("", "nothing to watch"),
])
def test_bad_config(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        serveopts.options_from_argv(["--config", _cfg(tmp_path, text)])


def test_config_is_bounded_and_regular(tmp_path: Path) -> None:
    big = _cfg(tmp_path, "# " + "x" * (targetspec.MAX_CONFIG_BYTES + 10) + "\n")
    with pytest.raises(SpecError, match="larger than 64 KiB"):
        targetspec.load_config(big)
    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(SpecError, match="not a regular file"):  # and it did not block
        targetspec.load_config(str(tmp_path / "fifo.toml"))
    with pytest.raises(SpecError, match="not a regular file"):
        targetspec.load_config(str(tmp_path))
    with pytest.raises(SpecError, match="cannot read"):
        targetspec.load_config(str(tmp_path / "missing.toml"))
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(SpecError, match="not UTF-8"):
        targetspec.load_config(str(tmp_path / "bin.toml"))


@pytest.mark.parametrize(("args", "message"), [
    ([], "nothing to watch"),
    (["--match", "("], "bad regex"),
    (["--port", "0"], "port must be from 1"),
    (["--config", "/nonexistent/serve.toml"], "cannot read"),
    (["--pidfile", "x.pid"], "absolute path"),
    (["--all", "--interval", "0"], "interval: must be a number"),
    (["--all", "--export-dir", "/nonexistent-dir"], "export_dir"),
    (["--all", "--listen", "nonsense"], "listen/token"),
])
def test_bad_input_through_the_cli(args: list[str], message: str) -> None:
    done = run_cli("serve", *args)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("accept-watch serve: error:") and message in lines[0], done
    assert "Traceback" not in done.stderr


def test_bad_toml_through_the_cli(tmp_path: Path) -> None:
    done = run_cli("serve", "--config", _cfg(tmp_path, "[[target]\nport = 1\n"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "serve.toml" in lines[0], done


MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
27 25 0:24 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw,nsdelegate
28 25 0:25 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,xattr,name=systemd
31 25 0:28 / /sys/fs/cgroup/memory rw shared:15 - cgroup cgroup rw,memory
"""


def test_cgroup_roots_from_mountinfo() -> None:
    assert units.cgroup_roots(MOUNTINFO) == ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"]
    pure_v2 = "29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
    assert units.cgroup_roots(pure_v2) == ["/sys/fs/cgroup"]


def test_unit_directory_found_by_control_group_or_by_name(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    unit = root / "system.slice" / "web.service"
    (unit / "sub").mkdir(parents=True)
    (unit / "cgroup.procs").write_text("10\n11\n")
    (unit / "sub" / "cgroup.procs").write_text("12\n")
    (root / "system.slice" / "other.service").mkdir()
    os.symlink(unit, root / "link.service")  # never followed
    assert units.find_unit_dirs([str(root)], "web.service", "/system.slice/web.service") == [str(unit)]
    assert units.find_unit_dirs([str(root)], "web.service", "/../../etc") == []  # stays under the root
    assert units.find_unit_dirs([str(root)], "web.service") == [str(unit)]
    assert units.find_unit_dirs([str(root)], "link.service") == []
    assert units.read_procs(str(unit)) == {10, 11, 12}
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"27 25 0:24 / {root} rw shared:10 - cgroup2 cgroup2 rw\n")
    state = units.resolve_unit("web.service", str(mountinfo), use_systemd=False)
    assert state.known and state.pids == (10, 11, 12)
    assert not units.resolve_unit("nope.service", str(mountinfo), use_systemd=False).known
    show = units.parse_show("LoadState=loaded\nMainPID=42\nControlGroup=/system.slice/web.service\n")
    assert show == {"LoadState": "loaded", "MainPID": "42", "ControlGroup": "/system.slice/web.service"}


def test_split_by_ownership() -> None:
    def wc(pid: int, port: int, n: int) -> WorkerCounters:
        return WorkerCounters(pid=pid, port=port, accepts=n, first_ns=1, last_ns=2, wait_count=n,
                              wait_sum_ns=0, wait_max_ns=0)

    snap = KernelSnapshot(
        taken_ns=5, workers=(wc(10, 80, 3), wc(11, 80, 4), wc(20, 90, 5)),
        wait_hist={(10, 80): {1: 3}, (20, 90): {2: 5}},
        listeners=(ListenerCounters(inode=100, port=80, accepts=7, depth_max=0, backlog_limit=128),
                   ListenerCounters(inode=200, port=90, accepts=5, depth_max=0, backlog_limit=128)),
        transitions={(80, 10, 11): 2, (90, 20, 20): 4}, diag={c: 0 for c in DiagCounter})
    a = targets.split(snap, {10, 11}, [100])
    assert [w.pid for w in a.workers] == [10, 11] and set(a.wait_hist) == {(10, 80)}
    assert [lst.inode for lst in a.listeners] == [100] and a.transitions == {(80, 10, 11): 2}
    b = targets.split(snap, {20}, [200])
    assert sum(w.accepts for w in a.workers) + sum(w.accepts for w in b.workers) == 12
    assert a.diag is snap.diag  # the shared loss counters stay whole


def test_families_merge_into_one_per_name() -> None:
    one = CounterMetricFamily("x", "h", labels=["server"])
    two = CounterMetricFamily("x", "h", labels=["server"])
    one.add_metric(["a"], 1)
    two.add_metric(["b"], 2)
    (fam,) = merged([one, two])
    assert [(s.labels["server"], s.value) for s in fam.samples] == [("a", 1), ("b", 2)]


class _Source:
    def target_list(self) -> list[dict]:
        return [{"server": "web", "up": True}]

    def document(self, name: str) -> dict | None:
        return {"server": "web", "total_accepts": 3, "workers": []} if name == "web" else None

    def metric_documents(self) -> list[tuple[str, bool, dict | None]]:
        doc = {"total_accepts": 3, "workers": [{"pid": 7, "alive": True, "role": "worker", "accepts": 3}]}
        return [("web", True, doc), ("db", False, None)]

    def daemon_counters(self) -> dict[str, float]:
        return {"pruned_workers": 2}


def test_serve_app_routes_and_token() -> None:
    from fastapi.testclient import TestClient

    from accept_watch.dashboard.serveapp import create_serve_app

    app = create_serve_app(_Source(), token="sekrit", allowed_hosts={"*"})
    client = TestClient(app)
    auth = {"authorization": "Bearer sekrit"}
    assert client.get("/metrics").status_code == 401
    assert client.get("/healthz").status_code == 200
    text = client.get("/metrics", headers=auth).text
    assert 'accept_watch_worker_accepts_total{pid="7",server="web"} 3.0' in text
    assert 'accept_watch_target_up{server="db"} 0.0' in text
    assert "accept_watch_pruned_workers_total 2.0" in text
    # In-kernel loss counters are one set for the whole daemon: said in their HELP, not split.
    helps = dict(line[len("# HELP "):].split(" ", 1) for line in text.splitlines()
                 if line.startswith("# HELP "))
    assert "daemon-wide" in helps["accept_watch_unattributed_accepts_total"]
    assert "daemon-wide" in helps["accept_watch_lost_events_total"]
    assert "daemon-wide" not in helps["accept_watch_evicted_workers_total"]  # per target (user space)
    assert text.count("# HELP accept_watch_unattributed_accepts_total") == 1
    assert text.count("# TYPE accept_watch_target_up gauge") == 1 and "process_cpu_seconds_total" in text
    assert client.get("/api/targets", headers=auth).json() == {"targets": [{"server": "web", "up": True}]}
    assert client.get("/api/targets/web", headers=auth).json()["total_accepts"] == 3
    assert client.get("/api/targets/nope", headers=auth).status_code == 404
    assert client.post("/metrics", headers=auth).status_code == 405
    loopback = TestClient(create_serve_app(_Source(), token=None, allowed_hosts={"testserver"}))
    assert loopback.get("/api/targets").status_code == 200
    assert loopback.get("/api/targets", headers={"host": "evil.example"}).status_code == 400


def test_exited_workers_are_folded_after_the_retention_time() -> None:
    """serve's retention (stats.Aggregator exited_retention_s): a worker that exited keeps its own record
    until the retention time has passed, then its accepts move into the exited figures (the total never
    changes), and once its kernel entry is deleted (forget_evicted) a new process with its pid starts
    from zero."""
    from tests.test_stats import START, counts_snap, make, topo, workers_by_pid

    s = 1_000_000_000
    agg, _clock = make(topo([101, 102]), exited_retention_s=5)
    agg.update(counts_snap(START + s, {101: 4, 102: 6}), topo([101, 102]), {}, alive={100, 101, 102})
    agg.update(counts_snap(START + 2 * s, {101: 4, 102: 6}), topo([101]), {}, alive={100, 101})
    doc = agg.document()
    assert workers_by_pid(doc)[102]["alive"] is False and doc["total_accepts"] == 10
    agg.update(counts_snap(START + 6 * s, {101: 4, 102: 6}), topo([101]), {}, alive={100, 101})
    assert 102 in workers_by_pid(agg.document())  # 4 s after its exit: kept
    agg.update(counts_snap(START + 8 * s, {101: 4, 102: 6}), topo([101]), {}, alive={100, 101})
    doc = agg.document()
    assert 102 not in workers_by_pid(doc) and doc["total_accepts"] == 10
    assert doc["diagnostics"]["evicted_accepts"] == 6 and agg.evicted_pids() == {102}
    agg.forget_evicted({102})  # its kernel counter was deleted; pid 102 is reused by a new worker
    agg.update(counts_snap(START + 9 * s, {101: 4, 102: 2}), topo([101, 102]), {}, alive={100, 101, 102})
    doc = agg.document()
    assert workers_by_pid(doc)[102]["accepts"] == 2 and doc["total_accepts"] == 12
