"""Connections accepted but not served: requests that wait inside a worker.

Many connections in flight is normal for a worker that serves them in parallel (threads, a child
process per connection, an event loop). Requests *wait inside* a worker only when it has accepted
connections whose request it has not even read: a single-threaded worker whose handler blocks while
its event loop already accepted the next ones. The kernel shows exactly that: an accepted socket's
unread bytes (sock_diag's idiag_rqueue). A socket counts as unread when it holds unread bytes in
two dumps DOUBLE_LOOK_S apart, so a request that just arrived and is about to be read is not
mistaken for one that waits.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from . import sockdiag
from .discovery import DiscoveryError, socket_inodes

DOUBLE_LOOK_S = 0.05


def unread_by_worker(pids: Iterable[int], listener_inodes: set[int], ports: set[int]) -> dict[int, int]:
    """pid -> number of its accepted connections with unread request bytes in both looks. Only in this
    process's network namespace (sock_diag); raises sockdiag.SockDiagError if the dump fails."""
    if not ports:
        return {}
    first = sockdiag.connections(ports)
    if not any(first.values()):
        return {}
    time.sleep(DOUBLE_LOOK_S)
    second = sockdiag.connections(ports)
    waiting = {ino for ino, n in first.items() if n > 0 and second.get(ino, 0) > 0}
    out: dict[int, int] = {}
    for pid in pids:
        try:
            held = socket_inodes(pid) - listener_inodes
        except DiscoveryError:
            continue
        n = len(held & waiting)
        if n:
            out[pid] = n
    return out
