"""Checks shared by the real-server verdict tests: accept-watch's export against the server's own log.

Counts first (a verdict about the wrong numbers proves nothing), then the answers: roles, the fairness
population, the verdict's pattern/cause/figures judged against what the log itself shows
(tests/groundtruth.py), flags.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

from tests import groundtruth as gt
from tests.servers import ClientResult, run_clients
from tests.watcher import WatchRun, start_watch

PATTERNS = ("round-robin", "concentrated", "random", "single-acceptor", "even", "not enough data")
CAUSES = ("fifo-wakeup", "lifo-wakeup", "exclusive-wakeup", "accept-mutex", "reuseport-hash", "race",
          "single-process", "unknown")


class Watched(Protocol):
    @property
    def master_pid(self) -> int: ...
    @property
    def port(self) -> int: ...
    def records(self) -> list[gt.LogRecord]: ...
    def close(self) -> None: ...


def watch_during(
    srv: Watched, tmp: Path, action: Callable[[], None], *extra: str, pid: int | None = None
) -> tuple[dict[str, Any], WatchRun]:
    """accept-watch on the server's master (or `pid`) while `action` runs; then stop it (SIGINT) and
    the server (its log is final once every process has stopped). The final export and the run."""
    run = start_watch(srv.master_pid if pid is None else pid, tmp, *extra)
    try:
        action()
    finally:
        code = run.stop()
        srv.close()
    assert code == 0, run.stderr()
    return run.document(), run


def load(port: int, n: int, concurrency: int, path: str = "/") -> ClientResult:
    result = run_clients(port, n, concurrency=concurrency, path=path)
    assert result.failed == 0, result.errors[:3]
    return result


class Background:
    """run_clients in a thread, for lifecycle steps taken while connections keep coming."""

    def __init__(self, port: int, n: int, concurrency: int, path: str = "/") -> None:
        self.result: ClientResult | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(port, n, concurrency, path), daemon=True)
        self._thread.start()

    def _run(self, port: int, n: int, concurrency: int, path: str) -> None:
        try:
            self.result = run_clients(port, n, concurrency=concurrency, path=path)
        except BaseException as exc:  # re-raised in join()
            self.error = exc

    def join(self) -> ClientResult:
        self._thread.join(150)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "background load did not finish"
        assert self.result.failed == 0, self.result.errors[:3]
        return self.result


# -- counts ---------------------------------------------------------------------------------------------


def assert_counts_exact(doc: dict[str, Any], records: list[gt.LogRecord], n: int | None = None) -> None:
    truth = gt.per_pid(records)
    if n is not None:
        assert len(records) == n, f"the server logged {len(records)} of {n} connections"
    exported = {w["pid"]: w["accepts"] for w in doc["workers"] if w["accepts"]}
    assert exported == truth, f"export {exported} != the server's log {truth}"
    assert doc["total_accepts"] == len(records), (doc["total_accepts"], len(records))
    assert doc["unattributed"] == 0, doc["unattributed"]


# -- answers --------------------------------------------------------------------------------------------


def roles(doc: dict[str, Any]) -> dict[int, str]:
    return {w["pid"]: w["role"] for w in doc["workers"]}


def assert_roles(doc: dict[str, Any], workers: Collection[int], helpers: Collection[int] = ()) -> None:
    """The server's real workers are "worker"; helpers (and USR2 masters, forked children) never are."""
    r = roles(doc)
    assert all(v in ("master", "worker", "helper") for v in r.values()), r
    missing = [p for p in workers if p not in r]
    assert not missing, f"workers {missing} are not in the export: {r}"
    assert {p: r[p] for p in workers} == dict.fromkeys(workers, "worker"), r
    assert not [p for p in helpers if r.get(p) == "worker"], f"helpers {list(helpers)} classed worker: {r}"


def fairness(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["analysis"]["fairness"]


def assert_fairness_population(
    doc: dict[str, Any], workers: int, live: dict[str, float] | None = None
) -> None:
    """Fairness is over the workers able to accept; live_workers is {min, max, mean}."""
    fair = fairness(doc)
    assert fair["workers"] == workers, fair
    assert "live_workers" in fair, fair
    lw = fair["live_workers"]
    assert set(lw) >= {"min", "max", "mean"}, lw
    assert lw["min"] <= lw["mean"] <= lw["max"], lw
    if live is not None:
        for k in ("min", "max", "mean"):
            assert abs(lw[k] - live[k]) <= 1.0, (lw, live)


def verdict(doc: dict[str, Any], port: int | None = None) -> dict[str, Any]:
    if port is None:
        return doc["analysis"]["verdict"]
    return doc["analysis"]["per_port"][str(port)]


def flag_codes(doc: dict[str, Any]) -> set[str]:
    return {f["code"] for f in doc["analysis"]["flags"]}


def assert_verdict_matches_log(
    doc: dict[str, Any], records: list[gt.LogRecord], port: int, sequence_exact: bool = False,
    known: gt.Lifetimes | None = None, baseline_tolerance: float = 0.06,
) -> gt.Spread:
    """The verdict about `port` is well-formed, counts that port's accepts exactly, and its pattern is
    consistent with the spread the log shows. sequence_exact: the log's order is the accept order (one
    connection at a time), so the same-worker rate must match the log's own."""
    on = gt.on_port(records, port)
    s = gt.spread(on, known)
    v = verdict(doc)
    assert v["pattern"] in PATTERNS, v
    where = f"{v['pattern']} ({v.get('cause')}): {v['sentence']} | log: {s}"
    fig = v["figures"]
    if s.single_acceptor:
        assert v["pattern"] == "single-acceptor", where
    elif s.even() and not s.streaky():
        assert_not_blamed(v, sequence_exact, where)
    if sequence_exact and fig.get("self_rate") is not None and s.self_rate is not None:
        # The first accept may lack a predecessor: one pair's difference.
        assert abs(fig["self_rate"] - s.self_rate) <= 1.5 / max(1, len(on) - 1), (fig, s)
    if fig.get("self_expected") is not None and s.self_expected is not None:
        life = gt.lifetimes(on, known)
        weighted = gt.expected_self_rate(on, life, weighted=True) or 0.0
        assert min(abs(fig["self_expected"] - s.self_expected),
                   abs(fig["self_expected"] - weighted)) <= baseline_tolerance, (fig, s, weighted)
    # The exact accept count on this port (issue 10: it counted transitions, one fewer), and a cause.
    assert fig.get("accepts") == len(on), (fig, len(on))
    assert v.get("cause") in CAUSES, v
    return s


def assert_no_replacement_blame(doc: dict[str, Any], records: list[gt.LogRecord], port: int,
                                known: gt.Lifetimes | None = None, sequence_exact: bool = False) -> None:
    """Churn cases: shares even among live workers, and no more same-worker repeats than independence
    among them gives, must not read as concentration."""
    s = gt.spread(gt.on_port(records, port), known)
    if s.workers > 1 and s.even() and not s.streaky():
        assert_not_blamed(verdict(doc), sequence_exact, f"{verdict(doc)['sentence']} | log: {s}")


def assert_not_blamed(v: dict[str, Any], sequence_exact: bool, where: str) -> None:
    """The log shows shares even among the live workers and no streaks. If its order is the accept order,
    nothing is concentrated. Otherwise (connections handled concurrently: the log's order is not the
    accept order) a "concentrated" verdict may only rest on the kernel's own sequence: its same-worker
    rate well above its live-aware independent baseline (that baseline is checked against the log's)."""
    assert v["pattern"] != "single-acceptor", where
    if v["pattern"] != "concentrated":
        return
    assert not sequence_exact, where
    fig = v["figures"]
    rate, expected = fig.get("self_rate"), fig.get("self_expected")
    assert rate is not None and expected is not None and rate > expected + 0.05, where


def assert_exited_not_alive(doc: dict[str, Any], exited: Collection[int]) -> None:
    by_pid = {w["pid"]: w for w in doc["workers"]}
    wrong = [p for p in exited if p in by_pid and by_pid[p]["alive"]]
    assert not wrong, f"exited processes still alive in the export: {wrong}"


def listener_modes(doc: dict[str, Any], port: int) -> set[str]:
    return {lst["mode"] for lst in doc["listeners"] if lst["port"] == port}
