"""Names and labels of the benchmark's modes, shared by the driver and the document."""

from __future__ import annotations

# nginx/gunicorn runs: every round runs these.
MODES = ("baseline", "aw", "aw-events", "bpftrace")
# Diagnostic mode (nginx at full speed only): accept-watch attached, its daemon stopped (SIGSTOP) for
# the load, so only the BPF programs run: their cost, separated from the daemon's.
PAUSED = "aw-paused"
# "-before": the same mode with accept-watch as it was at an earlier commit
# (before.py), so a change is measured against its predecessor in the same rounds.
AW_MODES = ("aw", "aw-events", "aw-paused", "aw-before", "aw-events-before")
BEFORE_MODES = {"aw-before": "aw", "aw-events-before": "aw-events"}
MODE_TEXT = {
    "baseline": "baseline (nothing attached)",
    "aw": "accept-watch (default: counters only, dashboard polled 1/s)",
    "aw-events": "accept-watch --events FILE (per-connection stream)",
    "bpftrace": "bpftrace one-liner (a line per accept, to a file)",
    "aw-paused": "accept-watch, daemon stopped (SIGSTOP) during the load: BPF programs only",
    "aw-before": "before: accept-watch at the earlier commit, default mode",
    "aw-events-before": "before: accept-watch at the earlier commit, --events FILE",
}

LOOPBACK_LABELS = {
    "baseline": "baseline (nothing attached)",
    "aw": "accept-watch (default: counters only)",
    "aw-before": "before: accept-watch at the earlier commit (default)",
    "aw-noinflight": "accept-watch --no-inflight (no state-change tracepoint)",
    "floor": "empty programs on accept-watch's hooks (the floor)",
    "floor-noinflight": "empty programs on the hooks of --no-inflight (its floor)",
    "bpftrace": "bpftrace one-liner (a line per accept, to a file)",
}
