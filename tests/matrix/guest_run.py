"""Runs inside a kernel-matrix guest (root, no network): `accept-watch doctor`, then for each probe
path a real gunicorn (sync workers) watched by the real CLI with that `--probe`, N client
connections, and the export compared with the app's own per-pid record.

Every outcome is one console line "KM-RESULT <json>" that scripts/kernel-matrix/run_matrix.py
parses; progress lines start with "KM-LOG". Not a pytest module (the host's `make test` must not
collect it): it is run by scripts/kernel-matrix/guest-init.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests import servers  # noqa: E402  (needs the repo on sys.path first)
from tests.watcher import run_cli, start_watch  # noqa: E402

PROBE_KINDS = ("fexit", "kretprobe", "tracepoint")  # what doctor checks one by one
PATHS = (*PROBE_KINDS, "auto", "fexit-blocked")
# fexit-blocked: a server already blocked inside accept() when fexit is attached. That call never
# returns through the new fexit hook; the syscall-exit backstop must count it, then be switched off.
BLOCKED_N = 20
# Queue waits are histogram bucket bounds: p99 may sit up to one bucket above the exact max.
BUCKET_SLACK = 1.07
# Doctor checks that may fail without any probe path needing them (shown as notes): fprobe is the
# multi-kprobe attach mechanism, which accept-watch does not use.
ADVISORY_CHECKS = frozenset({"CONFIG_FPROBE"})
# Every connection's queue wait must be known: the entry time is stamped when the child socket is
# created, before it is queued (stamping at SYN_RECV->ESTABLISHED lost a race with a worker
# accepting on another CPU; the matrix found it).
MIN_WAIT_KNOWN = 1.0
MAX_SANE_WAIT_US = 60e6  # a minute in the accept queue means garbage, not a slow emulator


def emit(kind: str, **fields: object) -> None:
    print("KM-RESULT " + json.dumps({"kind": kind, **fields}, sort_keys=True), flush=True)


def log(message: str) -> None:
    print(f"KM-LOG {message}", flush=True)


def expected_prototype_era(release: str) -> str:
    """The inet_csk_accept() prototype this kernel must have: it changed in 6.10."""
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise ValueError(f"cannot parse kernel release {release!r}")
    return "6.10+" if (int(m.group(1)), int(m.group(2))) >= (6, 10) else "before 6.10"


def run_doctor() -> dict:
    t0 = time.monotonic()
    proc = run_cli("doctor", "--json", timeout=1200)
    out = {"rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1), "checks": [],
           "stderr": proc.stderr.strip()[-2000:]}
    try:
        out["checks"] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out["stdout"] = proc.stdout[-2000:]
        out["problems"] = ["doctor --json printed no JSON"]
        return out
    problems = [] if proc.returncode == 0 else [f"doctor exited {proc.returncode}"]
    for c in out["checks"]:
        if c["ok"] is False and c["name"] not in ADVISORY_CHECKS:
            problems.append(f"doctor check {c['name']!r} failed: {c['detail']}")
    out["notes"] = [f"{c['name']}: {c['detail']}" for c in out["checks"]
                    if c["ok"] is False and c["name"] in ADVISORY_CHECKS]
    out["problems"] = problems
    return out


def check_doctor(doctor: dict, expect: dict) -> list[str]:
    """What doctor must say on these kernels: every path attachable, auto picks fexit, and the
    inet_csk_accept prototype of the kernel's era."""
    by_name = {c["name"]: c for c in doctor.get("checks", [])}
    p = []
    # Checks doctor itself failed are already problems (run_doctor); these catch what it left out
    # or got wrong while saying ok.
    for path in PROBE_KINDS:
        if f"probe {path}" not in by_name:
            p.append(f"doctor did not check probe {path}")
    auto = by_name.get("auto would use")
    if auto is None or (auto["ok"] and auto["detail"] != expect["auto"]):
        p.append(f"doctor: auto would use {auto and auto['detail']!r}, expected {expect['auto']!r}")
    proto = by_name.get("inet_csk_accept")
    if proto is None or (proto["ok"] and f"[{expect['era']}]" not in proto["detail"]):
        p.append(f"doctor: inet_csk_accept prototype {proto and proto['detail']!r}, "
                 f"kernel needs [{expect['era']}]")
    return p


def check_document(doc: dict, truth: dict[int, int], n: int, port: int, path: str, expect: dict) -> list[str]:
    """Everything that must hold for one run; returns the problems (empty: pass)."""
    p: list[str] = []
    counted = {w["pid"]: w["accepts"] for w in doc["workers"] if w["accepts"]}
    if sum(truth.values()) != n:
        p.append(f"the app recorded {sum(truth.values())} of {n} connections")
    if counted != truth:
        p.append(f"per-worker counts differ: accept-watch {counted} vs app {truth}")
    for key, want in (("total_accepts", n), ("lost_events", 0), ("unattributed", 0)):
        if doc.get(key) != want:
            p.append(f"{key} = {doc.get(key)}, expected {want}")
    want_probe = expect["auto"] if path == "auto" else path
    if doc.get("probe") != want_probe:
        p.append(f"probe = {doc.get('probe')!r}, expected {want_probe!r}")
    detail = doc.get("probe_detail") or ""
    if not detail:
        p.append("probe_detail is empty")
    if doc.get("probe") == "fexit" and f"[{expect['era']}]" not in detail:
        p.append(f"fexit used the wrong inet_csk_accept prototype: {detail!r} "
                 f"(kernel needs [{expect['era']}])")
    diag = doc.get("diagnostics", {})
    for key in ("stats_map_full", "fd_walk_failed", "tracked_map_full"):
        if diag.get(key):
            p.append(f"diagnostics.{key} = {diag[key]}")
    if doc.get("probe") in ("fexit", "kretprobe") and diag.get("backstop_accepts"):
        # The syscall-exit backstop counted accepts the primary hook missed: the hook is not proven.
        p.append(f"diagnostics.backstop_accepts = {diag['backstop_accepts']} "
                 f"(the {doc['probe']} hook missed them)")
    p += check_backstop(doc, retired_with_pending=None)
    # Listener: one shared socket on the server's port that saw every accept, with a sane queue.
    listeners = doc.get("listeners", [])
    if len(listeners) != 1:
        p.append(f"{len(listeners)} listeners, expected 1")
    else:
        lst = listeners[0]
        qd = lst.get("queue_depth", {})
        if lst.get("port") != port:
            p.append(f"listener port {lst.get('port')}, expected {port}")
        if lst.get("mode") != "shared":
            p.append(f"listener mode {lst.get('mode')!r}, expected 'shared'")
        if lst.get("accepts") != n:
            p.append(f"listener accepts {lst.get('accepts')}, expected {n}")
        missing = sorted(set(truth) - set(lst.get("pids", [])))
        if missing:
            p.append(f"listener pids {lst.get('pids')} miss workers {missing}")
        if not (isinstance(qd.get("limit"), int) and qd["limit"] > 0):
            p.append(f"queue_depth.limit = {qd.get('limit')!r}")
        elif not (0 <= qd.get("current", -1) <= qd["limit"] and 0 <= qd.get("max", -1) <= qd["limit"]):
            p.append(f"queue_depth out of range: {qd}")
    # Queue wait: every accepted connection has one, and the percentiles are ordered and bounded.
    waits = 0
    for w in doc["workers"]:
        q = w.get("queue_wait_us", {})
        waits += q.get("count") or 0
        if not w["accepts"]:
            continue
        vals = [q.get(k) for k in ("p50", "p99", "max", "mean")]
        if any(v is None for v in vals):
            p.append(f"worker {w['pid']}: queue_wait_us incomplete: {q}")
            continue
        p50, p99, mx, mean = vals
        if not (0 <= p50 <= p99 <= mx * BUCKET_SLACK and 0 <= mean <= mx and mx < MAX_SANE_WAIT_US):
            p.append(f"worker {w['pid']}: queue_wait_us not sane: {q}")
    unknown = diag.get("wait_unknown", 0)
    if waits + unknown != n:
        p.append(f"queue waits known for {waits} and unknown for {unknown} of {n} connections")
    if waits < MIN_WAIT_KNOWN * n:
        p.append(f"queue waits known for only {waits} of {n} connections "
                 f"(diagnostics.wait_unknown = {unknown})")
    return p


def check_backstop(doc: dict, retired_with_pending: int | None) -> list[str]:
    """fexit/kretprobe: the syscall-exit backstop must have been switched off once the accept() calls in
    progress at attach had returned (with exactly `retired_with_pending` of them, when given);
    tracepoint: it is the primary hook, never a backstop."""
    b = doc.get("backstop") or {}
    if doc.get("probe") == "tracepoint":
        return [] if b.get("state") == "not used" else [f"backstop {b} in tracepoint mode"]
    if b.get("state") != "retired":
        return [f"backstop not retired: {b}"]
    if retired_with_pending is not None and b.get("pending_at_attach") != retired_with_pending:
        return [f"backstop waited for {b.get('pending_at_attach')} accept() calls, "
                f"expected {retired_with_pending}"]
    return []


def run_blocked(n: int) -> dict:
    """A server blocked in accept() before fexit is attached: its first connection is returned by that
    old call (the backstop counts it), after which the backstop is switched off and fexit counts the rest."""
    out: dict = {"path": "fexit-blocked", "n": n}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, servers.start_blocked_acceptor(timeout_s=120) as srv:
        log(f"fexit-blocked: pid {srv.pid} blocked in accept() on port {srv.port}, starting accept-watch")
        run = start_watch(srv.pid, Path(tmp), "--probe", "fexit", timeout=900)
        out["attach_s"] = round(time.monotonic() - t0, 1)
        try:
            clients = servers.run_clients(srv.port, 1, concurrency=1, timeout_s=60)
            deadline = time.monotonic() + 120
            while "backstop switched off" not in run.stderr() and time.monotonic() < deadline:
                time.sleep(0.2)
            more = servers.run_clients(srv.port, n - 1, concurrency=1, timeout_s=60, deadline_s=600)
        finally:
            rc = run.stop(timeout=600)
        out["rc"], out["stderr"] = rc, run.stderr().strip()[-1500:]
        truth = srv.ground_truth()
        doc = run.document() if run.export.exists() else None
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["app"] = {str(k): v for k, v in truth.items()}
    failed = clients.failed + more.failed
    problems = [] if rc == 0 else [f"accept-watch exited {rc}"]
    if failed:
        problems.append(f"{failed} client connections failed")
    if doc is None:
        out["problems"] = [*problems, "no export written"]
        return out
    out.update(
        probe=doc.get("probe"), probe_detail=doc.get("probe_detail"), total_accepts=doc.get("total_accepts"),
        watch={str(w["pid"]): w["accepts"] for w in doc["workers"] if w["accepts"]},
        diagnostics={k: v for k, v in doc.get("diagnostics", {}).items() if v}, backstop=doc.get("backstop"),
    )
    counted = {w["pid"]: w["accepts"] for w in doc["workers"] if w["accepts"]}
    if counted != truth or sum(truth.values()) != n:
        problems.append(f"counts: accept-watch {counted} vs app {truth} ({n} connections)")
    if doc.get("probe") != "fexit":
        problems.append(f"probe = {doc.get('probe')!r}, expected 'fexit'")
    for key in ("unattributed", "lost_events"):
        if doc.get(key):
            problems.append(f"{key} = {doc.get(key)}")
    if doc.get("diagnostics", {}).get("backstop_accepts") != 1:
        got = doc.get("diagnostics", {}).get("backstop_accepts")
        problems.append(f"backstop_accepts = {got}, expected 1 (the accept() blocked before attach)")
    problems += check_backstop(doc, retired_with_pending=1)
    out["problems"] = problems
    return out


def run_path(path: str, n: int, workers: int, concurrency: int, expect: dict) -> dict:
    out: dict = {"path": path, "n": n}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, \
            servers.start_gunicorn(workers=workers, worker_class="sync", ready_timeout_s=300) as srv:
        log(f"{path}: gunicorn master {srv.master_pid} on port {srv.port}, "
            f"starting accept-watch --probe {path}")
        run = start_watch(srv.master_pid, Path(tmp), "--probe", path, timeout=900)
        out["attach_s"] = round(time.monotonic() - t0, 1)
        try:
            log(f"{path}: attached after {out['attach_s']} s, {n} connections")
            clients = servers.run_clients(srv.port, n, concurrency=concurrency, timeout_s=30, deadline_s=600)
        finally:
            rc = run.stop(timeout=600)
        out["rc"] = rc
        out["stderr"] = run.stderr().strip()[-1500:]
        truth = srv.ground_truth()
        port = srv.port
        doc = run.document() if run.export.exists() else None
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["app"] = {str(k): v for k, v in truth.items()}
    out["clients_failed"] = clients.failed
    problems = [] if rc == 0 else [f"accept-watch exited {rc}"]
    if clients.failed:
        problems.append(f"{clients.failed} client connections failed: {clients.errors[:3]}")
    if doc is None:
        problems.append("no export written")
    else:
        out["probe"] = doc.get("probe")
        out["probe_detail"] = doc.get("probe_detail")
        out["total_accepts"] = doc.get("total_accepts")
        out["lost_events"] = doc.get("lost_events")
        out["unattributed"] = doc.get("unattributed")
        out["watch"] = {str(w["pid"]): w["accepts"] for w in doc["workers"] if w["accepts"]}
        out["diagnostics"] = {k: v for k, v in doc.get("diagnostics", {}).items() if v}
        out["listeners"] = [{k: lst.get(k) for k in ("port", "mode", "accepts", "queue_depth")}
                            for lst in doc.get("listeners", [])]
        waits = [w["queue_wait_us"] for w in doc["workers"] if w["accepts"]]
        out["queue_wait_p50_us"] = max((w.get("p50") or 0 for w in waits), default=None)
        out["queue_wait_max_us"] = max((w.get("max") or 0 for w in waits), default=None)
        problems += check_document(doc, truth, n, port, path, expect)
    out["problems"] = problems
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="client connections per probe path")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    args = ap.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    bad = sorted(set(paths) - set(PATHS))
    if bad:
        raise SystemExit(f"unknown probe path(s): {', '.join(bad)}")
    release = os.uname().release
    emit("guest", kernel=release, python=sys.version.split()[0])
    try:
        doctor = run_doctor()
    except Exception as exc:  # one broken step must not hide the others' results
        doctor = {"problems": [f"doctor crashed: {type(exc).__name__}: {exc}"], "checks": []}
    proto = next((c["detail"] for c in doctor["checks"] if c["name"] == "inet_csk_accept"), None)
    auto = next((c["detail"] for c in doctor["checks"] if c["name"] == "auto would use" and c["ok"]), None)
    # --probe auto must pick the best path the kernel offers; these kernels offer fexit.
    expect = {"era": expected_prototype_era(release), "auto": "fexit"}
    doctor["problems"] += check_doctor(doctor, expect)
    emit("doctor", **doctor, prototype=proto, auto=auto, expected_era=expect["era"])
    for path in paths:
        try:
            if path == "fexit-blocked":
                result = run_blocked(BLOCKED_N)
            else:
                result = run_path(path, args.n, args.workers, args.concurrency, expect)
        except Exception as exc:
            result = {"path": path, "n": args.n,
                      "problems": [f"crashed: {type(exc).__name__}: {exc}"],
                      "traceback": traceback.format_exc()[-3000:]}
        emit("path", **result)
        log(f"{path}: {'PASS' if not result['problems'] else 'FAIL: ' + '; '.join(result['problems'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
