"""The "why" of a verdict: which mechanism hands out the connections, from what was observed.

The cause is the mechanism in effect, named only from evidence accept-watch saw: the listener's mode
(an SO_REUSEPORT group is visible in the socket table) and how the workers wait (daemon/waitmode.py:
the syscall each is blocked in and whether the listener is in its wait set). Nothing observed, no
cause: "unknown". The sentence then says how that mechanism produces the pattern seen, or that the
pattern is unusual for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

CAUSES = ("fifo-wakeup", "lifo-wakeup", "exclusive-wakeup", "accept-mutex", "reuseport-hash", "race",
          "single-process", "unknown")

_MODE_CAUSE = {
    "blocking-accept": ("fifo-wakeup", "workers block in accept() on the shared socket"),
    "epoll": ("lifo-wakeup", "workers wait in epoll with the shared socket registered"),
    "epoll-exclusive": ("exclusive-wakeup", "workers wait in epoll with EPOLLEXCLUSIVE on the shared socket"),
    "accept-mutex": ("accept-mutex", "only the accept-mutex holder has the listener in its epoll set"),
    "poll/select": ("race", "workers wait in poll/select with the shared socket in their set"),
}


@dataclass(frozen=True, slots=True)
class Verdict:
    pattern: str  # one of analysis.PATTERNS
    confidence: str  # "low" | "medium" | "high"
    sentence: str  # one plain-language line
    figures: dict[str, Any] = field(default_factory=dict)
    cause: str = "unknown"  # one of CAUSES
    evidence: str = ""  # what the cause rests on

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "confidence": self.confidence,
            "sentence": self.sentence,
            "cause": self.cause,
            "evidence": self.evidence,
            "figures": dict(self.figures),
        }


def pct(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def span(low: float, high: float) -> str:
    """ "12.3-12.8 %", or "12.5 %" when both ends round alike."""
    a, b = f"{100.0 * low:.1f}", f"{100.0 * high:.1f}"
    return f"{a} %" if a == b else f"{a}-{b} %"


def dominant_wait_mode(wait_modes: Mapping[int, str] | None, pids: Iterable[int]) -> str | None:
    """The wait mode shared by most of these workers (None when unknown)."""
    if not wait_modes:
        return None
    modes = Counter(wait_modes[p] for p in pids if p in wait_modes and wait_modes[p] != "unknown")
    if not modes:
        return None
    return modes.most_common(1)[0][0]


def mechanism(listener_mode: str | None, wait_mode: str | None, workers: int,
              sockets: int | None = None) -> tuple[str, str]:
    """(cause, evidence) for one port."""
    if workers == 1:
        return "single-process", "one process accepts on this port"
    if listener_mode == "reuseport":
        n = f"{sockets} sockets" if sockets else "one socket per worker"
        return "reuseport-hash", f"the port is an SO_REUSEPORT group ({n}): the kernel picks the socket"
    if wait_mode in _MODE_CAUSE:
        return _MODE_CAUSE[wait_mode]
    return "unknown", "how the workers wait for connections was not observed"


def why(pattern: str, cause: str, *, taking_turns: bool = False) -> str:
    """How the mechanism produces the pattern (or that the pattern is unusual for it)."""
    if cause == "reuseport-hash":
        if pattern == "concentrated" or pattern == "single-acceptor":
            return ("SO_REUSEPORT hashes each connection's addresses and ports to one worker's socket: "
                    "with few distinct clients, or a slow worker whose own queue grows, the split is uneven")
        return "SO_REUSEPORT hashes each connection's addresses and ports to one worker's socket"
    if cause == "accept-mutex":
        if pattern in ("concentrated", "single-acceptor"):
            return ("the server's accept mutex: only the mutex holder has the listener in its epoll set, "
                    "and a worker that is not busy keeps winning it")
        return "the server's accept mutex passes between workers, one accepting at a time"
    if pattern == "round-robin":
        if cause == "fifo-wakeup":
            return "workers block in accept() and the kernel wakes them in FIFO order"
        return ("under load each worker takes the next queued connection as soon as it is free, "
                "so they take turns")
    if pattern in ("concentrated", "single-acceptor"):
        if cause == "fifo-wakeup":
            return "unusual for blocking accept() (FIFO): check whether the other workers are busy or stuck"
        if cause == "exclusive-wakeup":
            return ("EPOLLEXCLUSIVE wakes a single waiter, the same first ones in the wait queue, "
                    "so they keep winning")
        if cause == "lifo-wakeup":
            if taking_turns:
                return ("typical of epoll wake-ups: every waiter is woken and the same few workers "
                        "keep winning")
            return "typical of epoll wake-ups (LIFO: the most recently active worker wins)"
        if cause == "race":
            return "workers race after every poll/select wake-up and the one already running wins"
        return "some workers win the wake-ups more often (wake-up order, CPU placement or slower workers)"
    if pattern == "random":
        if cause == "fifo-wakeup":
            # Blocked accept() is FIFO among the waiters; which workers wait changes with the load.
            return ("each connection goes to the longest-waiting worker blocked in accept(), and which "
                    "workers are free to wait changes with the load, so the order mixes")
        return "workers race for the shared socket and whichever is free first takes the next connection"
    return ""
