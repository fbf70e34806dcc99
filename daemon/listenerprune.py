"""Which listeners' kernel entries `accept-watch serve` may delete: closed ones, after the retention time.

Every restart of a watched server opens a new listening socket (a new inode), so the kernel's
per-listener map gains an entry per restart; a daemon running for weeks would fill it (MAX_LISTENERS)
and per-listener counting would stop. A listener no up target holds any more is deleted once it has
been gone for the retention time (the same horizon exited workers get): a restart's successor, a
USR2 upgrade's overlap or a target briefly down keeps its entries meanwhile. Its figures stay in user
space (daemon/listenerstate.py keeps a closed listener's last counters). A port's last-acceptor entry
goes when no up target listens on that port and no listener entry kept for it remains.

Pure bookkeeping (no kernel access): serve.py feeds it the kernel's listeners and the targets' sockets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class ListenerPruner:
    def __init__(self, retention_s: float) -> None:
        self.retention_s = retention_s
        self._gone_since: dict[int, float] = {}  # inode -> when first seen held by no up target

    def due(self, kernel: Mapping[int, int], held_inodes: Iterable[int], held_ports: Iterable[int],
            now: float) -> tuple[set[int], set[int]]:
        """kernel: inode -> port of every listener entry in the kernel map now. Returns (inodes, ports)
        whose entries may be deleted. Bounded: only inodes present in the kernel map are remembered."""
        held = set(held_inodes)
        for inode in [i for i in self._gone_since if i not in kernel or i in held]:
            del self._gone_since[inode]
        doomed: set[int] = set()
        for inode in kernel:
            if inode in held:
                continue
            since = self._gone_since.setdefault(inode, now)
            if now - since >= self.retention_s:
                doomed.add(inode)
        for inode in doomed:
            del self._gone_since[inode]
        kept_ports = {port for inode, port in kernel.items() if inode not in doomed}
        ports = {kernel[i] for i in doomed} - set(held_ports) - kept_ports
        return doomed, ports
