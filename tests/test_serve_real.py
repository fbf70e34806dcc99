"""`accept-watch serve` on real servers: a real gunicorn and a real nginx watched at once by one daemon
(one set of BPF programs), counts per target exact against each server's own records through a restart
of one and the disappearance and return of the other; `--all` picking up a server started after the
daemon; a target restarted 20 times with pid-labelled series and memory bounded after the retention
time; systemd units read from real cgroups this test creates; bad input refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from accept_watch.daemon import units
from tests import groundtruth as gt
from tests import servers
from tests.servewatch import ServeRun, start_nginx_at, start_serve, wait_for
from tests.watcher import free_port, run_cli

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("kernel_ok")]


def _pid_series(run: ServeRun, server: str) -> dict[str, float]:
    found = run.samples("accept_watch_worker_accepts_total", server=server)
    return {dict(k)["pid"]: v for k, v in found.items()}


def _promtool_ok(text: str) -> None:
    if shutil.which("promtool"):
        done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done


def _up(run: ServeRun, name: str, generation: int) -> bool:
    t = run.targets().get(name)
    return t is not None and t["up"] and t["generation"] == generation


def test_gunicorn_and_nginx_through_restart_and_return(tmp_path: Path) -> None:
    web, gport, nport = free_port(), free_port(), free_port()
    pidfile = tmp_path / "gunicorn.pid"
    exports = tmp_path / "exports"
    exports.mkdir()
    g = servers.start_gunicorn(workers=2, port=gport, extra_args=["--pid", str(pidfile)])
    n = start_nginx_at(nport)
    run = start_serve(tmp_path, "--pidfile", f"web={pidfile}", "--port", f"nginx={nport}",
                      "--resolve-every", "1", "--retention", "3", "--export-dir", str(exports), web=web)
    truth_g: list[dict[int, int]] = []
    truth_n: list[dict[int, int]] = []
    try:
        assert _up(run, "web", 1) and _up(run, "nginx", 1), run.targets()
        assert servers.run_clients(gport, 60).ok == 60 and servers.run_clients(nport, 80).ok == 80
        wait_for(lambda: run.value("accept_watch_accepts_total", server="web") == 60
                 and run.value("accept_watch_accepts_total", server="nginx") == 80, 10, run.stderr)
        # gunicorn: killed and started again on the same pid file and port (a new master, new sockets)
        g.close()
        truth_g.append(g.ground_truth())
        g = servers.start_gunicorn(workers=2, port=gport, extra_args=["--pid", str(pidfile)])
        # nginx: gone (the target is kept, down), then back on its port
        n.close()
        truth_n.append(gt.per_pid(n.records()))
        wait_for(lambda: not run.targets()["nginx"]["up"], 15, run.stderr)
        assert run.value("accept_watch_target_up", server="nginx") == 0
        assert run.value("accept_watch_accepts_total", server="nginx") == 80  # kept while down
        n = start_nginx_at(nport)
        wait_for(lambda: _up(run, "web", 2) and _up(run, "nginx", 2), 20, run.stderr)
        assert servers.run_clients(gport, 40).ok == 40 and servers.run_clients(nport, 50).ok == 50
        wait_for(lambda: run.value("accept_watch_accepts_total", server="web") == 100
                 and run.value("accept_watch_accepts_total", server="nginx") == 130, 10, run.stderr)
        # The first generation's workers are folded into pid="exited" once the retention time has passed.
        wait_for(lambda: len(_pid_series(run, "web")) == 3 and len(_pid_series(run, "nginx")) == 3, 20,
                 lambda: f"{_pid_series(run, 'web')} {_pid_series(run, 'nginx')}")
        now_g, now_n = g.ground_truth(), gt.per_pid(n.records())
        assert _pid_series(run, "web") == {**{str(p): c for p, c in now_g.items()},
                                           "exited": sum(truth_g[0].values())}
        assert _pid_series(run, "nginx") == {**{str(p): float(c) for p, c in now_n.items()},
                                             "exited": sum(truth_n[0].values())}
        assert run.value("accept_watch_masters", server="web") == 2
        assert run.value("accept_watch_masters", server="nginx") == 2
        # ... and their kernel entries deleted at the next prune
        wait_for(lambda: (run.value("accept_watch_pruned_workers_total") or 0) >= 4, 10, run.stderr)
        _promtool_ok(run.get("/metrics"))
        doc = run.document("web")
        assert doc["server"] == "web" and doc["total_accepts"] == 100 and doc["unattributed"] == 0
    finally:
        code = run.stop()
        g.close()
        n.close()
    assert code == 0, run.stderr()
    log = run.stderr()
    assert "target web: up, generation 2" in log and "target nginx: down" in log
    assert "\x1b" not in log, log
    assert all(line.startswith("accept-watch serve: ") for line in log.splitlines()), log
    for name, total in (("web", 100), ("nginx", 130)):
        final = json.loads((exports / f"{name}.json").read_text())
        assert final["server"] == name and final["total_accepts"] == total and final["ended_at"], final
    assert sum(truth_g[0].values()) + sum(g.ground_truth().values()) == 100
    assert sum(truth_n[0].values()) + len(n.records()) == 130


def test_all_picks_up_a_server_started_later(tmp_path: Path) -> None:
    web = free_port()
    run = start_serve(tmp_path, "--all", "--resolve-every", "1", "--retention", "2", web=web)
    try:
        with servers.start_gunicorn(workers=2) as srv:
            name = f"gunicorn:{srv.port}"
            wait_for(lambda: name in run.targets() and run.targets()[name]["up"], 20, run.stderr)
            assert run.targets()[name]["dynamic"] is True
            assert servers.run_clients(srv.port, 30).ok == 30
            wait_for(lambda: run.value("accept_watch_accepts_total", server=name) == 30, 10, run.stderr)
            truth = srv.ground_truth()
            assert {p: v for p, v in _pid_series(run, name).items() if p != "exited"} == \
                {str(p): float(c) for p, c in truth.items()}
        # Gone for longer than the retention time: an --all target is dropped, its series end.
        wait_for(lambda: name not in run.targets(), 20, run.stderr)
        assert run.value("accept_watch_accepts_total", server=name) is None
    finally:
        code = run.stop()
    assert code == 0, run.stderr()
    assert f"target {name}: up, generation 1" in run.stderr()
    assert f"target {name}: down for 2 s, no longer watched" in run.stderr()


def test_all_over_the_target_cap_is_refused_once(tmp_path: Path) -> None:
    web = free_port()
    run = start_serve(tmp_path, "--pidfile", f"{tmp_path}/none.pid", "--all", "--max-targets", "1",
                      "--resolve-every", "0.5", web=web)
    try:
        with servers.start_gunicorn(workers=2) as srv:
            line = f"not watching gunicorn:{srv.port} (master {srv.master_pid}): 1 targets already"
            wait_for(lambda: line in run.stderr(), 20, run.stderr)
            time.sleep(1.5)  # three more scans
            assert run.stderr().count(line) == 1
            assert list(run.targets()) == ["none"]
            assert (run.value("accept_watch_refused_targets_total") or 0) >= 1
    finally:
        assert run.stop() == 0, run.stderr()


def test_match_finds_the_server_not_the_daemon(tmp_path: Path) -> None:
    """--match: the regex also matches accept-watch's own command line (it holds a listening socket
    too, its HTTP port): the server is found, never the daemon."""
    tag = f"aw-match-{os.getpid()}"
    web = free_port()
    with servers.start_gunicorn(workers=2, extra_args=["--name", tag]) as srv:
        run = start_serve(tmp_path, "--match", f"m=--name {tag}", web=web)
        try:
            assert run.targets()["m"]["master_pid"] == srv.master_pid, run.targets()
            assert servers.run_clients(srv.port, 25).ok == 25
            wait_for(lambda: run.value("accept_watch_accepts_total", server="m") == 25, 10, run.stderr)
        finally:
            assert run.stop() == 0, run.stderr()


def test_usr2_upgrade_is_the_same_target(tmp_path: Path) -> None:
    """gunicorn USR2 then TERM of the old master: the new master holds the same sockets and becomes the
    target's next generation; every connection of both generations counted."""
    from tests.realservers_py import start_gunicorn_server

    web = free_port()
    with start_gunicorn_server(workers=2) as s:
        run = start_serve(tmp_path, "--pid", f"g={s.master_pid}", web=web)
        try:
            assert servers.run_clients(s.port, 20).ok == 20
            s.usr2()
            s.term_old_master()
            wait_for(lambda: _up(run, "g", 2), 15, run.stderr)
            assert servers.run_clients(s.port, 30).ok == 30
            wait_for(lambda: run.value("accept_watch_accepts_total", server="g") == 50, 10, run.stderr)
            assert len(s.records()) == 50
        finally:
            assert run.stop() == 0, run.stderr()
    assert "holds the same sockets" in run.stderr()


def test_twenty_restarts_stay_bounded(tmp_path: Path) -> None:
    web, port = free_port(), free_port()
    pidfile = tmp_path / "small.pid"
    run = start_serve(tmp_path, "--pidfile", f"small={pidfile}", "--resolve-every", "0.5", "--retention", "2",
                      web=web)
    totals: Counter[int] = Counter()
    rss: list[int] = []
    listener_entries: list[float] = []
    try:
        for i in range(1, 21):
            with servers.start_gunicorn(workers=1, port=port, extra_args=["--pid", str(pidfile)]) as srv:
                wait_for(lambda i=i: _up(run, "small", i), 15, run.stderr)
                # and read once with it (a generation shorter than one read is counted, not listed)
                wait_for(lambda srv=srv: run.document("small")["master_pid"] == srv.master_pid, 5, run.stderr)
                assert servers.run_clients(port, 5).ok == 5
            totals.update(srv.ground_truth())
            rss.append(run.rss_bytes())
            listener_entries.append(run.value("accept_watch_kernel_listener_entries") or 0)
        wait_for(lambda: run.value("accept_watch_accepts_total", server="small") == 100, 10, run.stderr)
        # After the retention time every exited worker is folded away: one pid series, "exited".
        wait_for(lambda: list(_pid_series(run, "small")) == ["exited"], 20,
                 lambda: str(_pid_series(run, "small")))
        assert _pid_series(run, "small") == {"exited": 100.0} and sum(totals.values()) == 100
        # The document too: every record folded away (none alive, all past the retention time).
        wait_for(lambda: run.document("small")["workers"] == [], 10,
                 lambda: str([(w["pid"], w["alive"]) for w in run.document("small")["workers"]]))
        doc = run.document("small")
        assert doc["total_accepts"] == 100 and doc["unattributed"] == 0
        assert doc["diagnostics"]["evicted_workers"] >= len(totals)  # every worker that accepted, at least
        assert len(doc["masters"]) == 20
        assert (run.value("accept_watch_pruned_workers_total") or 0) >= 20
        assert run.value("accept_watch_target_up", server="small") == 0
        # Each restart opened a new listening socket (20 kernel listener entries): the closed ones are
        # deleted from the kernel map after the retention time, their figures kept in the document.
        wait_for(lambda: run.value("accept_watch_kernel_listener_entries") == 0, 20,
                 lambda: f"{run.value('accept_watch_kernel_listener_entries')} entries; {run.stderr()}")
        assert run.value("accept_watch_pruned_listeners_total") == 20
        assert max(listener_entries) < 12, listener_entries  # bounded during the restarts (20 unpruned)
        listeners = run.document("small")["listeners"]
        assert len(listeners) == 20 and sum(lst["accepts"] for lst in listeners) == 100, listeners
        # Memory: flat once warm (the later restarts add nothing that stays).
        assert rss[-1] - rss[4] < 16 << 20, [r >> 20 for r in rss]
    finally:
        code = run.stop()
    assert code == 0, run.stderr()


def _cgroup_dir(root: str, name: str) -> Path:
    path = Path(root) / name
    path.mkdir()
    return path


def _move(pids: list[int], cgroup: Path) -> None:
    for pid in pids:
        (cgroup / "cgroup.procs").write_text(f"{pid}\n")


def test_units_from_real_cgroups(tmp_path: Path) -> None:
    """Two gunicorns moved into cgroups named like systemd units, one in each hierarchy systemd uses
    here (cgroup2 and the v1 name=systemd one); systemd itself does not run on these VMs."""
    with open(units.MOUNTINFO) as f:
        roots = units.cgroup_roots(f.read())
    assert roots, "no cgroup2 or name=systemd hierarchy mounted"
    tag = f"aw-test-{os.getpid()}"
    web = free_port()
    made: list[Path] = []
    srvs = [servers.start_gunicorn(workers=2) for _ in roots[:2]]
    try:
        for i, (root, srv) in enumerate(zip(roots, srvs, strict=False)):
            cg = _cgroup_dir(root, f"{tag}-{i}.service")
            made.append(cg)
            _move([srv.master_pid, *srv.worker_pids()], cg)
        args = [a for i in range(len(srvs)) for a in ("--unit", f"{tag}-{i}")]
        run = start_serve(tmp_path, *args, web=web)
        try:
            for i, srv in enumerate(srvs):
                assert run.targets()[f"{tag}-{i}"]["master_pid"] == srv.master_pid, run.targets()
                assert servers.run_clients(srv.port, 20 + i).ok == 20 + i
            for i, srv in enumerate(srvs):
                name = f"{tag}-{i}"
                want = 20 + i
                def counted(name: str = name, want: int = want) -> bool:
                    return run.value("accept_watch_accepts_total", server=name) == want

                wait_for(counted, 10, run.stderr)
                assert {p: v for p, v in _pid_series(run, f"{tag}-{i}").items() if p != "exited"} == \
                    {str(p): float(c) for p, c in srv.ground_truth().items()}
        finally:
            assert run.stop() == 0, run.stderr()
    finally:
        for srv in srvs:
            srv.close()
        for cg in made:
            for _ in range(50):
                try:
                    cg.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def test_unknown_unit_and_nothing_running(tmp_path: Path) -> None:
    done = run_cli("serve", "--unit", "aw-no-such-unit-xyz", "--dry-run")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "no such unit" in lines[0], done
    done = run_cli("serve", "--pid", "4194303", "--dry-run")
    assert done.returncode != 0 and "no such process" in done.stderr and len(done.stderr.splitlines()) == 1
    # A pid file naming nothing yet is a target that is down, not an error.
    done = run_cli("serve", "--pidfile", str(tmp_path / "later.pid"), "--dry-run")
    assert done.returncode == 0 and "dry run OK" in done.stdout, done
    assert "down at start" in done.stderr
