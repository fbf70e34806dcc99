"""Issue 10 on real servers through deploys, each step under load: gunicorn --max-requests 50, HUP, TTIN/TTOU,
SIGKILL of a worker, USR2 then TERM of the old master, `nginx -s reload`, nginx's binary upgrade (USR2,
WINCH, QUIT), Apache's graceful restart (event MPM) and a `uvicorn --workers` worker killed and restarted.

Each scenario runs once (module-scoped fixture) and is judged by separate tests: per-pid accepts equal the
server's own log, exited processes are "alive": false in the final export, replacement alone is never
called concentration (tests/groundtruth.py judges shares among the workers alive at each connection),
and the fairness population counts live workers. Graceful steps (HUP, TTIN/TTOU, USR2, TERM, reload) run
while clients keep connecting; SIGKILL hits an idle worker (a connection inside a killed worker could be
accepted and never logged, and the counts must stay exact).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests import groundtruth as gt
from tests import verdicts as v
from tests.conftest import kernel_unavailable_reason
from tests.realservers import APACHE_PATH, alive, children, start_nginx
from tests.realservers_apache import start_apache_threaded
from tests.realservers_deploy import NginxUpgrade, start_daemon_nginx, uvicorn_kill_worker
from tests.realservers_py import GunicornServer, start_gunicorn_server, start_uvicorn
from tests.watcher import start_watch

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("kernel_ok")]

N = 4
# gunicorn: each request takes SLEEP_MS and C = 2N clients keep every worker busy, so the server itself
# spreads evenly (a worker back from a request takes the next queued connection); the premise is checked.
SLEEP_MS = 3
C = 2 * N


@dataclass
class Run:
    doc: dict[str, Any]
    records: list[gt.LogRecord]
    port: int
    exited: set[int]  # processes that exited while accept-watch watched
    masters: list[int] = field(default_factory=list)
    max_live: int = N + 1  # the most workers alive at once (+1: a replacement may overlap a moment)
    live_mean: tuple[float, float] = (N - 1, N + 1.5)  # where the mean number of live workers must be
    live_min: int = 1  # the fewest live workers the export may report (a handover is not a dip)
    even_expected: bool = True  # the server itself spreads evenly (so the no-blame check has teeth)
    # |accept-watch's same-worker baseline - the log's|. Placed by the kernel's per-port accept sequence,
    # every lifecycle case here came within 0.013 of the log's (one run each on a quiet machine); by
    # time spread over ~1 s reads it was up to 0.14 off when bursts and a handover shared one read.
    baseline_tolerance: float = 0.06
    watch_alive_after_master_exit: bool | None = None
    exit_code: int | None = 0  # accept-watch's, after our SIGINT
    stderr: str = ""
    booted: dict[int, int] = field(default_factory=dict)  # gunicorn: worker -> its master
    known: gt.Lifetimes = field(default_factory=dict)  # from the workers present at start and end


def _gunicorn_run(srv: GunicornServer, tmp: Path, steps: Callable[[GunicornServer], None],
                  boots_known: bool = True) -> Run:
    """Watch `srv` from its first master while `steps` run; exited = every process of the server that
    existed during the run and is gone at its end (accept-watch stopped first: its export was written
    while the survivors were still running)."""
    seen: set[int] = set(srv.masters) | set(srv.worker_pids())
    initial, final = srv.worker_pids(), []
    boots: dict[int, float] = {}
    watch = start_watch(srv.master_pid, tmp)
    watching: bool | None = None
    exited: set[int] = set()
    try:
        steps(srv)
        watching = watch.proc.poll() is None
        final = srv.worker_pids()
        boots = srv.boot_times()
        time.sleep(0.3)  # a worker recycled by its last request exits just after answering it
        seen |= set(srv.booted()) | set(srv.masters)
        exited = {p for p in seen if not alive(p)}  # gone before accept-watch's final export
    finally:
        code = watch.stop()
        srv.close()
    # The exit code is judged by test_watch_ran_to_the_end: a scenario whose watcher died early still
    # has its export (written at exit) for the other checks.
    records = srv.records()
    return Run(watch.document(), records, srv.port, exited, list(srv.masters),
               watch_alive_after_master_exit=watching, booted=srv.booted(), exit_code=code,
               stderr=watch.stderr(), known=_known(initial, final, boots if boots_known else {}, records))


def _known(initial: list[int], final: list[int], boots: dict[int, float],
           records: list[gt.LogRecord]) -> gt.Lifetimes:
    """Workers there at the start lived from the beginning, those there at the end until the end; the
    others from their boot (post_worker_init) to their last record."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for r in records:
        first.setdefault(r.pid, r.t)
        last[r.pid] = r.t
    known: dict[int, tuple[float, float]] = {}
    for pid in set(initial) | set(final) | set(boots) | set(first):
        lo = -math.inf if pid in initial else boots.get(pid, first.get(pid, math.inf))
        hi = math.inf if pid in final else last.get(pid, lo)
        if lo <= hi:  # a worker that booted and left without a record was never seen live: left out
            known[pid] = (lo, hi)
    return known


def _max_requests(tmp: Path) -> Run:
    def steps(s: GunicornServer) -> None:
        v.load(s.port, 400, C)

    # All workers reach 50 together and are replaced together: their boots leave moments with one or two
    # workers up, so a worker's life is taken from its first to its last record (as the brief's default).
    run = _gunicorn_run(start_gunicorn_server(N, max_requests=50, sleep_ms=SLEEP_MS), tmp, steps,
                        boots_known=False)
    # Lives taken from records cannot show an even spread by themselves here (eight generations of 50
    # in a couple of seconds; a worker's first and last record bound its life only roughly), so the
    # premise is not asserted; the verdict is still judged against the log and must not blame
    # replacement. The simultaneous recycling leaves moments with fewer workers up.
    run.even_expected = False
    run.live_mean = (N - 1.5, N + 1.5)
    return run


T = TypeVar("T")


def _during(port: int, requests: int, concurrency: int, action: Callable[[], T], path: str = "/") -> T:
    """`action` (a signal to the master) while `requests` connections are being made; its result."""
    bg = v.Background(port, requests, concurrency, path)
    result = action()
    bg.join()
    return result


def _hup(tmp: Path) -> Run:
    def steps(s: GunicornServer) -> None:
        v.load(s.port, 120, C)
        _during(s.port, 150, C, s.hup)
        v.load(s.port, 120, C)

    run = _gunicorn_run(start_gunicorn_server(N, sleep_ms=SLEEP_MS), tmp, steps)
    run.max_live = 2 * N  # old and new workers overlap while the old ones finish
    return run


def _ttin_ttou(tmp: Path) -> Run:
    def steps(s: GunicornServer) -> None:
        v.load(s.port, 100, C)
        _during(s.port, 100, C, s.ttin)
        v.load(s.port, 100, C)
        _during(s.port, 100, C, s.ttou)
        v.load(s.port, 100, C)

    run = _gunicorn_run(start_gunicorn_server(N, sleep_ms=SLEEP_MS), tmp, steps)
    run.max_live = N + 2
    return run


def _sigkill(tmp: Path) -> Run:
    def steps(s: GunicornServer) -> None:
        v.load(s.port, 150, C)
        s.kill_worker(children(s.master_pid)[0])
        v.load(s.port, 150, C)

    return _gunicorn_run(start_gunicorn_server(N, sleep_ms=SLEEP_MS), tmp, steps)


def _usr2(tmp: Path) -> Run:
    def steps(s: GunicornServer) -> None:
        v.load(s.port, 100, C)
        _during(s.port, 100, C, s.usr2)
        v.load(s.port, 100, C)  # both generations serve
        _during(s.port, 100, C, s.term_old_master)
        v.load(s.port, 150, C)  # the new generation only: accept-watch must still count

    run = _gunicorn_run(start_gunicorn_server(N, sleep_ms=SLEEP_MS), tmp, steps)
    run.max_live = 2 * N
    run.live_mean = (N, 2 * N)  # both generations accept between USR2 and the old master's TERM
    return run


def _nginx_reload(tmp: Path) -> Run:
    srv = start_nginx(N)
    first = srv.worker_pids()
    state: dict[str, Any] = {}

    def action() -> None:
        v.load(srv.port, 120, 2)
        bg = v.Background(srv.port, 150, 2)
        state["new"] = srv.reload()
        state["final"] = srv.worker_pids()
        bg.join()
        v.load(srv.port, 120, 2)

    doc, _ = v.watch_during(srv, tmp, action)
    # nginx's own spread (EPOLLEXCLUSIVE wake-ups) may be uneven: the verdict is judged against the log.
    # No live-worker floor: under load nginx's old workers stop accepting before the new ones have
    # started (the log itself shows moments with one accepting).
    # Apache's log stamps each request when a thread of the child starts it: its order among children is
    # not the kernel's accept order, and a loaded machine brings the new generation up child by child
    # (the log itself then shows 2.8 live workers on average, the same-worker baselines 0.08 apart).
    return Run(doc, srv.records(), srv.port, set(first), [srv.master_pid], max_live=2 * N,
               even_expected=False, baseline_tolerance=0.1,
               known=gt.from_membership(first, state.get("final", [])))


def _nginx_binary_upgrade(tmp: Path) -> Run:
    """USR2 (a new master execs, its workers start), WINCH (the old workers finish), QUIT (the old master
    exits), all under load: accept-watch follows the new master on the same socket."""
    up = NginxUpgrade(start_daemon_nginx(N))
    srv = up.srv
    first = srv.worker_pids()
    state: dict[str, Any] = {}
    watch = start_watch(srv.master_pid, tmp)
    try:
        v.load(srv.port, 100, 2)
        new_master = _during(srv.port, 120, 2, up.usr2)
        bg = v.Background(srv.port, 120, 2)
        up.winch_old()
        up.quit_old()
        bg.join()
        state["final"] = up.workers_of(new_master)
        v.load(srv.port, 120, 2)  # the new generation only
        state["watching"] = watch.proc.poll() is None
    finally:
        code = watch.stop()
        up.close()
    exited = set(first) | {up.masters[0]}
    # The new generation is live from its fork (it waits while the old one still wins): never fewer
    # than N live workers, up to 2N while both serve.
    return Run(watch.document(), srv.records(), srv.port, exited, list(up.masters), max_live=2 * N,
               live_mean=(N, 2 * N), live_min=N, even_expected=False, exit_code=code, stderr=watch.stderr(),
               watch_alive_after_master_exit=state.get("watching"),
               known=gt.from_membership(first, state.get("final", [])))


def _apache_graceful(tmp: Path) -> Run:
    """Apache event MPM, SIGUSR1 (apachectl -k graceful) under load: a new generation of children, the
    old ones finish their connections and exit."""
    srv = start_apache_threaded("event", N, threads=2)
    first = srv.worker_pids()
    state: dict[str, Any] = {}

    def action() -> None:
        v.load(srv.port, 100, 2, APACHE_PATH)
        state["final"] = _during(srv.port, 150, 2, srv.graceful, APACHE_PATH)
        v.load(srv.port, 100, 2, APACHE_PATH)

    doc, _ = v.watch_during(srv, tmp, action)
    # Apache's log stamps each request when a thread of the child starts it: its order among children is
    # not the kernel's accept order, and a loaded machine brings the new generation up child by child
    # (the log itself then shows 2.8 live workers on average, the same-worker baselines 0.08 apart).
    return Run(doc, srv.records(), srv.port, set(first), [srv.master_pid], max_live=2 * N,
               even_expected=False, baseline_tolerance=0.1,
               known=gt.from_membership(first, state.get("final", [])))


def _uvicorn_kill_worker(tmp: Path) -> Run:
    """`uvicorn --workers 4`, one idle worker SIGKILLed: uvicorn's supervisor starts a replacement."""
    srv = start_uvicorn(N)
    first = srv.worker_pids()
    state: dict[str, Any] = {}

    def action() -> None:
        v.load(srv.port, 150, C)
        state["victim"] = first[0]
        uvicorn_kill_worker(srv, first[0])
        state["final"] = srv.worker_pids()
        v.load(srv.port, 150, C)

    doc, _ = v.watch_during(srv, tmp, action)
    # uvicorn's workers are event loops: its own spread may be uneven; judged against the log.
    return Run(doc, srv.records(), srv.port, {first[0]}, [srv.master_pid], even_expected=False,
               known=gt.from_membership(first, state.get("final", [])))


SCENARIOS: dict[str, Callable[[Path], Run]] = {
    "gunicorn-max-requests": _max_requests,
    "gunicorn-hup": _hup,
    "gunicorn-ttin-ttou": _ttin_ttou,
    "gunicorn-sigkill-worker": _sigkill,
    "gunicorn-usr2-term-old-master": _usr2,
    "nginx-reload": _nginx_reload,
    "nginx-binary-upgrade": _nginx_binary_upgrade,
    "apache-graceful": _apache_graceful,
    "uvicorn-kill-worker": _uvicorn_kill_worker,
}


_RUNS: dict[str, Run] = {}


def _get(name: str, factory: pytest.TempPathFactory) -> Run:
    """Each scenario runs once per session, whichever test asks first."""
    reason = kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if name not in _RUNS:
        _RUNS[name] = SCENARIOS[name](factory.mktemp(name))
    return _RUNS[name]


@pytest.fixture(scope="module", params=list(SCENARIOS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _get(request.param, tmp_path_factory)


def test_watch_ran_to_the_end(run: Run) -> None:
    """accept-watch kept watching through every step and exited 0 on our SIGINT."""
    assert run.watch_alive_after_master_exit is not False, f"accept-watch stopped early: {run.stderr}"
    assert run.exit_code == 0, run.stderr


def test_counts_exact(run: Run) -> None:
    v.assert_counts_exact(run.doc, run.records)
    assert len(gt.per_pid(run.records)) > N, "the premise: workers were replaced during the run"


def test_exited_processes_not_alive(run: Run) -> None:
    assert run.exited, "the premise: some process exited during the run"
    v.assert_exited_not_alive(run.doc, run.exited)


def test_replacement_is_not_concentration(run: Run) -> None:
    s = gt.spread(gt.on_port(run.records, run.port), run.known)
    if run.even_expected:
        # 0.5: on a loaded machine a replacement worker starts taking connections a while after its
        # boot marker (seen: 0.55 of its share from the marker on, HUP and SIGKILL cases).
        assert s.even(0.5) and not s.streaky(), f"the premise: the log shows an even, streak-free spread: {s}"
    v.assert_no_replacement_blame(run.doc, run.records, run.port, run.known)
    v.assert_verdict_matches_log(run.doc, run.records, run.port, known=run.known,
                                 baseline_tolerance=run.baseline_tolerance)


def test_fairness_counts_live_workers(run: Run) -> None:
    fair = v.fairness(run.doc)
    assert "live_workers" in fair, fair
    lw = fair["live_workers"]
    assert run.live_min <= lw["min"] <= lw["mean"] <= lw["max"] <= run.max_live, (lw, run.live_min)
    # The live mean is near the number serving at a time, never the number of pids ever seen; below the
    # scenario's floor only where the log itself shows fewer workers live (accept-weighted, from it).
    log_mean = gt.spread(gt.on_port(run.records, run.port), run.known).live["mean"]
    lo, hi = min(run.live_mean[0], log_mean - 0.5), run.live_mean[1]
    assert lo <= lw["mean"] <= hi, (lw, run.live_mean)
    workers = {w["pid"] for w in run.doc["workers"] if w["role"] == "worker"}
    assert set(gt.per_pid(run.records)) <= workers, "every process that accepted is a worker"


def test_usr2_then_old_master_exit_is_followed(tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _get("gunicorn-usr2-term-old-master", tmp_path_factory)
    old, new = run.masters
    assert run.watch_alive_after_master_exit, f"accept-watch stopped when the old master exited: {run.stderr}"
    r = v.roles(run.doc)
    # The new master holds the listener and never accepts: not a worker, never in fairness.
    assert r.get(new) != "worker", r
    masters = {m["pid"]: m for m in run.doc.get("masters", [])}
    assert set(masters) >= {old, new}, run.doc.get("masters")
    assert masters[old]["alive"] is False and masters[new]["alive"] is True, masters
    # The last 150 connections went to the new generation only: all counted.
    new_gen = {p for p, m in run.booted.items() if m == new}
    truth = {p: c for p, c in gt.per_pid(run.records).items() if p in new_gen}
    assert sum(truth.values()) >= 150, truth
    exported = {w["pid"]: w["accepts"] for w in run.doc["workers"] if w["pid"] in new_gen and w["accepts"]}
    assert exported == truth
