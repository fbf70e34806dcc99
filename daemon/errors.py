"""The one exception discovery raises, in a module of its own so that the modules discovery is split into
(proctree, listensockets, successors) and discovery itself can all raise it without importing each other."""

from __future__ import annotations

import os


class DiscoveryError(Exception):
    """One-line reason why the server could not be inspected."""


def denied(what: str) -> str:
    """'access denied ...' with the likely cause: as root, asking for root would be no help."""
    if os.geteuid() != 0:
        return f"access denied {what} (run as root)"
    return (f"access denied {what} although running as root: the kernel refuses it (the process is in "
            "another user namespace or container, or this process lacks CAP_SYS_PTRACE, or an LSM/Yama "
            "policy forbids it)")
