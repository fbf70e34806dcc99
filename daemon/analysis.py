"""Why a distribution looks the way it does: the "analysis" section of the document.

Two questions are answered separately, because they have different causes:
  * fairness - how evenly the accepts are shared, each worker against its fair share of the accepts
    made while it was live (daemon/fairshare.py), so replacing workers alone never reads as unfair;
  * sequence - who accepts *next*, per port, from the in-kernel (previous pid -> pid) transition
    counts (daemon/verdict.py: the patterns and their thresholds).
The mechanism behind it (the verdict's cause) comes from daemon/explain.py; the statistics from
daemon/figures.py. This module reads the document (checking every field it uses), picks who competes,
and assembles per-port verdicts, overall figures and flags.
"""

from __future__ import annotations

import math
from collections import Counter as _Counter
from collections.abc import Iterable, Mapping
from typing import Any

from .document import Document, StreamedDocument
from .explain import Verdict, dominant_wait_mode
from .fairshare import self_baseline
from .figures import (  # noqa: F401 - re-exported: the analysis API
    chi2_sf,
    chi_square_even,
    coefficient_of_variation,
    fairness,
    fairness_vs_expected,
    gini,
    jain_index,
    max_mean_ratio,
    regularized_gamma_q,
)
from .verdict import (  # noqa: F401 - re-exported: the analysis API
    ALPHA,
    MATERIAL_SHARE,
    PATTERNS,
    STICKY_RATIO,
    STRONG_Z,
    Z_CRIT,
    classify,
    min_accepts,
)
from .waitmode import WaitMode

# ---------------------------------------------------------------------------------------------------
# The "analysis" section of the snapshot document
# ---------------------------------------------------------------------------------------------------


def _int_field(obj: Mapping[str, Any], key: str, where: str, *, minimum: int | None = None) -> int:
    if key not in obj:
        raise ValueError(f"analysis: {where} has no {key!r}")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"analysis: {where}.{key} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"analysis: {where}.{key} must be >= {minimum}, got {v}")
    return v


def _list_field(doc: Mapping[str, Any], key: str) -> list[Any]:
    if key not in doc:
        raise ValueError(f"analysis: the snapshot has no {key!r}")
    v = doc[key]
    if not isinstance(v, list):
        raise ValueError(f"analysis: {key!r} must be a list, got {type(v).__name__}")
    for i, item in enumerate(v):
        if not isinstance(item, dict):
            raise ValueError(f"analysis: {key}[{i}] must be an object, got {type(item).__name__}")
    return v


def _wait_mode_entry(pid: Any, wm: Any) -> tuple[int, dict[str, str]]:
    try:
        ipid = int(pid)
    except (TypeError, ValueError):
        raise ValueError(f"analysis: wait_modes key must be a pid, got {pid!r}") from None
    if isinstance(wm, WaitMode):
        return ipid, wm.to_dict()
    if isinstance(wm, Mapping) and isinstance(wm.get("mode"), str):
        return ipid, {"mode": wm["mode"], "detail": str(wm.get("detail", ""))}
    raise ValueError(f"analysis: wait mode of pid {pid} must be a WaitMode or {{'mode': ...}}, got {wm!r}")


def _window_fairness(
    rate_history: list[Any], window_s: float, alive_workers: Iterable[int]
) -> dict[str, Any] | None:
    """Fairness over the rate_history entries of the last window_s seconds (None without history)."""
    if not rate_history:
        return None
    t_last = rate_history[-1][0]
    summed: dict[int, int] = dict.fromkeys(alive_workers, 0)
    seconds = 0
    for t, per_pid in rate_history:
        if t <= t_last - window_s:
            continue
        seconds += 1
        for pid, c in per_pid.items():
            summed[int(pid)] = summed.get(int(pid), 0) + c
    if not summed:
        return None
    pids = sorted(summed)
    out = fairness([summed[p] for p in pids])
    out["seconds"] = seconds
    return out


def _check_rate_history(doc: Mapping[str, Any]) -> list[Any]:
    history = doc.get("rate_history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise ValueError("analysis: 'rate_history' must be a list")
    for i, entry in enumerate(history):
        if (
            not isinstance(entry, list | tuple)
            or len(entry) != 2
            or isinstance(entry[0], bool)
            or not isinstance(entry[0], int | float)
            or not isinstance(entry[1], dict)
        ):
            raise ValueError(f"analysis: rate_history[{i}] must be [seconds, {{pid: count}}], got {entry!r}")
        for pid, c in entry[1].items():
            if not str(pid).isdigit() or isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ValueError(f"analysis: rate_history[{i}] has a bad entry {pid!r}: {c!r}")
    return sorted(history, key=lambda e: e[0])


# Requests wait inside a worker when it holds accepted connections while its handler is blocked
# (daemon/blocked.py: every thread blocked in something other than waiting for connections, at two
# looks 50 ms apart) and it kept accepting with connections open. Many connections in flight alone is
# normal for threaded, forking and event-loop servers that serve them in parallel: not evidence.
# Two such samples (one can be chance) and a handful of accepts made while busy.
INFLIGHT_BUSY_MIN = 3
BLOCKED_SAMPLES_MIN = 2


def inflight_flagged(inf: Mapping[str, Any]) -> bool:
    try:
        return (int(inf.get("busy_accepts") or 0) >= INFLIGHT_BUSY_MIN
                and int(inf.get("blocked_samples") or 0) >= BLOCKED_SAMPLES_MIN
                and int(inf.get("blocked_max") or 0) >= 2)
    except (TypeError, ValueError, OverflowError):
        return False


def _inflight_flags(workers: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    busy = [w for w in workers if isinstance(w.get("inflight"), Mapping) and inflight_flagged(w["inflight"])]
    if not busy:
        return []
    busy.sort(key=lambda w: -int(w["inflight"].get("blocked_max") or 0))
    top = busy[0]
    inf = top["inflight"]
    others = f" (and {len(busy) - 1} more worker(s))" if len(busy) > 1 else ""
    return [{
        "code": "inflight_queueing",
        "message": f"worker {top['pid']} was seen blocked in its handler while holding up to "
        f"{inf['blocked_max']} accepted connections ({inf['blocked_samples']} samples), and accepted "
        f"{inf['busy_accepts']} while holding open ones{others}: requests wait inside the worker, where "
        "the accept queue does not show them.",
    }]


def _fair_share_port(doc: Mapping[str, Any], port: int) -> Mapping[str, Any] | None:
    fs = doc.get("fair_share")
    if not isinstance(fs, Mapping):
        return None
    entry = fs.get(str(port))
    return entry if isinstance(entry, Mapping) else None


def _pid_map(raw: Any, where: str, kind: type) -> dict[int, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"analysis: {where} must be an object")
    out: dict[int, Any] = {}
    for k, v in raw.items():
        if not str(k).isdigit() or isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"analysis: {where} has a bad entry {k!r}: {v!r}")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"analysis: {where}[{k}] must be a finite number >= 0, got {v!r}")
        out[int(k)] = kind(v)
    return out


def _spans(entry: Mapping[str, Any], where: str) -> dict[int, tuple[float, float]]:
    """The live spans the baseline weighs: on the accept clock; in seconds from exports made before
    the accept clock existed."""
    key = "accept_spans" if entry.get("accept_spans") else "spans"
    where = f"{where}.{key}"
    raw = entry.get(key) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"analysis: {where} must be an object")
    out: dict[int, tuple[float, float]] = {}
    for k, v in raw.items():
        if (not str(k).isdigit() or not isinstance(v, list | tuple) or len(v) != 2
                or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                           for x in v)
                or v[0] > v[1]):
            raise ValueError(f"analysis: {where}[{k!r}] must be [first, last], got {v!r}")
        out[int(k)] = (float(v[0]), float(v[1]))
    return out


def may_compete(w: Mapping[str, Any]) -> bool:
    """A worker (role from evidence; the model's default) or any process that did accept."""
    accepts = w.get("accepts")
    return w.get("role", "worker") == "worker" or (isinstance(accepts, int | float) and accepts > 0)


def competing_pids(workers: Iterable[Mapping[str, Any]]) -> list[int]:
    """Who the accepts are shared by now - the one rule every view's fair share comes from: the live
    workers (roles from evidence, daemon/roles.py; masters and helpers never compete) and any process
    that did accept; once none is alive, every one of them."""
    ws = [w for w in workers if isinstance(w, Mapping) and isinstance(w.get("pid"), int) and may_compete(w)]
    live = [w for w in ws if w.get("alive", True)]
    return sorted(w["pid"] for w in (live or ws))


def competitors(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The analysis' `competitors` section ({"pids", "fair_share"}); computed by the same rule for a
    document analysed by an older version (or built by hand)."""
    section = doc.get("analysis")
    stored = section.get("competitors") if isinstance(section, Mapping) else None
    if (isinstance(stored, Mapping) and isinstance(stored.get("pids"), list)
            and (stored.get("fair_share") is None or isinstance(stored.get("fair_share"), float))):
        return {"pids": list(stored["pids"]), "fair_share": stored.get("fair_share")}
    pids = competing_pids(doc.get("workers") or [])
    return {"pids": pids, "fair_share": 1 / len(pids) if pids else None}


def analyzed(document: Document, wait_modes: Mapping[Any, Any] | None = None) -> Document:
    """The document with its analysis section; a failure leaves the counts valid and says why the
    "why" is missing (the run loop calls this once per update)."""
    try:
        section = analyze(document, wait_modes)
    except Exception as exc:
        section = {"error": f"analysis failed: {type(exc).__name__}: {exc}"}
    return document.with_analysis(section)


def analyze(doc: Document | Mapping[str, Any], wait_modes: Mapping[Any, Any] | None = None) -> dict[str, Any]:
    """Build the snapshot document's "analysis" section (JSON-serializable).

    doc: a Document (daemon/document.py) or its dict form (checked field by field here).
    wait_modes: pid -> WaitMode (or {"mode", "detail"}), e.g. from waitmode.detect_wait_modes; optional.
    """
    if isinstance(doc, StreamedDocument):
        doc = doc.to_dict()
    if not isinstance(doc, Mapping):
        raise ValueError(f"analysis: the snapshot must be an object, got {type(doc).__name__}")
    workers = _list_field(doc, "workers")
    listeners = _list_field(doc, "listeners")
    transitions = _list_field(doc, "transitions")
    history = _check_rate_history(doc)

    accepts: dict[int, int] = {}
    role: dict[int, str] = {}
    alive: dict[int, bool] = {}
    for i, w in enumerate(workers):
        pid = _int_field(w, "pid", f"workers[{i}]", minimum=1)
        if pid in accepts:
            raise ValueError(f"analysis: pid {pid} appears twice in workers")
        accepts[pid] = _int_field(w, "accepts", f"workers[{i}]", minimum=0)
        role[pid] = str(w.get("role", "worker"))
        alive[pid] = bool(w.get("alive", True))

    modes: dict[int, dict[str, str]] = dict(_wait_mode_entry(p, wm) for p, wm in (wait_modes or {}).items())
    mode_names = {p: m["mode"] for p, m in modes.items()}

    # Who competes: the workers (roles from evidence, daemon/roles.py), and any process that did
    # accept (a single-process server, or an export from before roles were evidence-based).
    def competes(pid: int) -> bool:
        return pid == 0 or accepts.get(pid, 0) > 0 or role.get(pid, "worker") == "worker"

    overall_pids = sorted(p for p in accepts if competes(p))
    flags: list[dict[str, str]] = []

    # Per-port transitions.
    by_port: dict[int, dict[tuple[int, int], int]] = {}
    for i, t in enumerate(transitions):
        where = f"transitions[{i}]"
        port = _int_field(t, "port", where, minimum=0)
        key = (_int_field(t, "from", where, minimum=0), _int_field(t, "to", where, minimum=1))
        c = _int_field(t, "count", where, minimum=0)
        by_port.setdefault(port, {})
        by_port[port][key] = by_port[port].get(key, 0) + c

    port_pids: dict[int, set[int]] = {}
    port_holders: dict[int, set[int]] = {}
    port_mode: dict[int, str] = {}
    port_accepts: dict[int, int] = {}
    port_sockets: dict[int, int] = {}
    for i, lst in enumerate(listeners):
        port = _int_field(lst, "port", f"listeners[{i}]", minimum=0)
        pids = lst.get("pids", [])
        if not isinstance(pids, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in pids
        ):
            raise ValueError(f"analysis: listeners[{i}].pids must be a list of pids")
        port_holders.setdefault(port, set()).update(pids)
        port_pids.setdefault(port, set()).update(p for p in pids if competes(p) and alive.get(p, True))
        port_mode[port] = str(lst.get("mode", "")) or port_mode.get(port, "")
        port_sockets[port] = port_sockets.get(port, 0) + 1
        if "accepts" in lst:
            port_accepts[port] = port_accepts.get(port, 0) + _int_field(lst, "accepts", f"listeners[{i}]")
        qd = lst.get("queue_depth") or {}
        if not isinstance(qd, dict):
            raise ValueError(f"analysis: listeners[{i}].queue_depth must be an object")
        q_max, q_limit = qd.get("max"), qd.get("limit")
        if q_max is not None and q_limit is not None:
            _int_field(qd, "max", f"listeners[{i}].queue_depth", minimum=0)
            _int_field(qd, "limit", f"listeners[{i}].queue_depth", minimum=0)
            # 90 %: the queue is about to overflow (SYNs then get dropped or retried).
            if q_limit and q_max >= 0.9 * q_limit:
                flags.append({
                    "code": "queue_near_limit",
                    "message": f"port {port}: the listen queue reached {q_max} of {q_limit}; "
                    "new connections may be dropped - workers are not accepting fast enough.",
                })

    ports = sorted(set(port_pids) | set(by_port))
    per_port: dict[str, dict[str, Any]] = {}
    port_totals: dict[int, int] = {}
    overall_expected: dict[int, float] = {}
    overall_observed: dict[int, int] = {}
    live_overall: dict[str, Any] | None = None
    for port in ports:
        trans = by_port.get(port)
        candidates = set(port_pids[port]) if port in port_pids else set(overall_pids)
        bystanders = len({p for p in port_holders.get(port, set()) if not competes(p) and alive.get(p, True)})
        common = {"listener_mode": port_mode.get(port), "wait_modes": mode_names,
                  "sockets": port_sockets.get(port), "bystanders": bystanders}
        entry = _fair_share_port(doc, port)
        if entry is not None:
            observed = _pid_map(entry.get("observed") or {}, f"fair_share[{port}].observed", int)
            expected = _pid_map(entry.get("expected") or {}, f"fair_share[{port}].expected", float)
            keep = {p for p in set(observed) | set(expected) if competes(p)}
            keep |= {p for p in observed if observed[p]}
            counts = {p: observed.get(p, 0) for p in keep | (candidates - set(expected))}
            exp = {p: expected.get(p, 0.0) for p in counts}
            live = entry.get("live_workers") if isinstance(entry.get("live_workers"), Mapping) else None
            successors: dict[int, int] = {}
            for (prev, _cur), c in (trans or {}).items():
                if prev:
                    successors[prev] = successors.get(prev, 0) + c
            q = self_baseline(counts, exp, _spans(entry, f"fair_share[{port}]"), successors)
            verdict = classify(counts, trans or ({} if trans is not None else None), expected=exp,
                               self_expected=q, live_workers=live, **common)
            for p, c in counts.items():
                overall_observed[p] = overall_observed.get(p, 0) + c
                overall_expected[p] = overall_expected.get(p, 0.0) + exp.get(p, 0.0)
            if live and (live_overall is None or (live.get("max") or 0) > (live_overall.get("max") or 0)):
                live_overall = dict(live)
        elif trans:
            counts = dict.fromkeys(candidates, 0)
            for (_prev, cur), c in trans.items():
                counts[cur] = counts.get(cur, 0) + c
            verdict = classify(counts, trans, **common)
        elif len(ports) == 1:
            counts = {p: accepts.get(p, 0) for p in (candidates | {p for p in overall_pids if accepts[p]})}
            verdict = classify(counts, None, **common)
        else:
            counts = {}
            verdict = Verdict("not enough data", "low",
                              f"Not enough data: no accept-sequence data for port {port} "
                              f"({port_accepts.get(port, 0)} accepts), and worker totals mix several ports.",
                              {"workers": len(candidates), "accepts": port_accepts.get(port, 0),
                               "sequence": False})
        port_totals[port] = sum(counts.values())
        per_port[str(port)] = verdict.to_dict()

    if overall_observed:
        fair = fairness_vs_expected(overall_observed, overall_expected)
        fair.pop("ratio_by_pid")
        fair["fair_share_by_pid"] = {str(p): round(s, 4) for p, s in fair["fair_share_by_pid"].items()}
    elif overall_pids:
        fair = fairness([accepts[p] for p in overall_pids])
    else:
        fair = {k: None for k in fairness([0])} | {"workers": 0, "accepts": 0}
    fair["live_workers"] = live_overall or {"min": None, "max": None, "mean": None}
    fair["windows"] = {
        f"{w}s": _window_fairness(history, w, (p for p in overall_pids if alive.get(p, True) and p != 0))
        for w in (10, 60)
    }

    if ports:
        busiest = max(ports, key=lambda p: (port_totals[p], -p))
        overall = dict(per_port[str(busiest)])
        overall["port"] = busiest
        if len(ports) > 1:
            overall["sentence"] = f"Port {busiest} (busiest of {len(ports)}): {overall['sentence']}"
    elif overall_pids:
        overall = classify({p: accepts[p] for p in overall_pids}, None, wait_modes=mode_names).to_dict()
        overall["port"] = None
    else:
        overall = Verdict("not enough data", "low",
                          "Not enough data: no workers have been seen yet.").to_dict()
        overall["port"] = None

    flags.extend(_flags(doc, overall, overall_pids, accepts, alive, mode_names, competes))
    worker_modes = {p: m for p, m in mode_names.items() if competes(p) and role.get(p) != "helper"}
    summary = _Counter(worker_modes.values())
    pids_now = competing_pids(workers)
    return {
        "fairness": fair,
        "per_port": per_port,
        "verdict": overall,
        "wait_modes": {
            "by_pid": {str(p): modes[p] for p in sorted(modes)},
            "counts": dict(sorted(summary.items())),
            "dominant": dominant_wait_mode(worker_modes, worker_modes) if worker_modes else None,
        },
        "flags": flags,
        "competitors": {"pids": pids_now, "fair_share": 1 / len(pids_now) if pids_now else None},
    }


def _flags(doc: Mapping[str, Any], overall: Mapping[str, Any], overall_pids: list[int],
           accepts: dict[int, int], alive: dict[int, bool], mode_names: dict[int, str],
           competes: Any) -> list[dict[str, str]]:
    """Conditions that change how the figures should be read."""
    flags: list[dict[str, str]] = []
    if overall["pattern"] == "not enough data":
        flags.append({"code": "not_enough_data", "message": overall["sentence"]})
    unattributed = doc.get("unattributed", 0) or 0
    if unattributed:
        flags.append({"code": "unattributed",
                      "message": f"{unattributed} accepts could not be attributed: counts are not exact."})
    diag = doc.get("diagnostics") or {}
    if isinstance(diag, dict) and diag.get("transitions_map_full"):
        flags.append({"code": "transitions_incomplete",
                      "message": f"the transition map was full {diag['transitions_map_full']} times: "
                      "the sequence pattern is based on incomplete data."})
    live = [p for p in overall_pids if alive.get(p, True) and p != 0]
    total = sum(accepts.get(p, 0) for p in overall_pids)
    idle = [p for p in live if accepts.get(p, 0) == 0]
    if idle and total >= min_accepts(len(live)):
        flags.append({"code": "idle_workers",
                      "message": f"{len(idle)} of {len(live)} live workers accepted nothing out of {total} "
                      "connections."})
    gone = [p for p in overall_pids if not alive.get(p, True)]
    if gone:
        flags.append({"code": "workers_replaced",
                      "message": f"{len(gone)} workers that accepted connections have exited (e.g. "
                      "max_requests recycling, a reload): each worker's fair share counts only the time "
                      "it was live."})
    # A master holds the listener but waits for its workers, not for connections: its mode is listed,
    # not counted.
    known = {m for p, m in mode_names.items() if competes(p) and m != "unknown"}
    if len(known) > 1:
        flags.append({"code": "wait_mode_mixed",
                      "message": f"workers wait differently: {', '.join(sorted(known))}."})
    flags.extend(_inflight_flags(doc.get("workers") or []))
    return flags
