"""Which container a process lives in, and its pid there: for servers run in containers and watched
from the host.

Two facts per process, both from /proc (read bounded, once per process record):
  nspid      the last field of NSpid: in /proc/PID/status, the pid the process has in its own
             (innermost) pid namespace, i.e. what the server's own logs and `ps` inside the container
             show. Only reported when it differs from the host pid.
  container  from /proc/PID/cgroup: the cgroup path, and where a container runtime named it, the
             runtime and the container id (podman's libpod-<id>, docker-<id>.scope or /docker/<id>,
             containerd's cri-containerd-<id>.scope, CRI-O's crio-<id>.scope, a Kubernetes pod's
             /kubepods/.../pod<uid>/<id>).

Cgroup paths are chosen by whoever creates the cgroup: untrusted. The id is taken only when it is
12-64 hex digits; the path is cut to MAX_PATH characters and anything outside a small safe set is
replaced, so the document, the terminal and Prometheus labels never carry a control character.
"""

from __future__ import annotations

import re
from typing import Any

MAX_STATUS = 64 * 1024  # /proc/PID/status with a long Groups: line is still far below this
MAX_CGROUP = 16 * 1024
MAX_PATH = 256
_SAFE = re.compile(r"[^A-Za-z0-9_.:@=+,/-]")
_HEX = r"([0-9a-f]{12,64})"
_UID = r"([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"

# One path component each; conmon's own cgroups (libpod-conmon-, crio-conmon-) never match: \Z after
# the hex id, and "conmon" is not hex.
_COMPONENT_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"libpod-{_HEX}(?:\.scope)?\Z"), "podman"),
    (re.compile(rf"docker-{_HEX}\.scope\Z"), "docker"),
    (re.compile(rf"cri-containerd-{_HEX}\.scope\Z"), "containerd"),
    (re.compile(rf"crio-{_HEX}\.scope\Z"), "cri-o"),
)
_POD = re.compile(rf"(?:^|-)pod{_UID}(?:\.slice)?\Z")
_BARE_ID = re.compile(rf"{_HEX}\Z")


def _read(path: str, limit: int) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace")
    except OSError:
        return None


def parse_nspid(status: str) -> int | None:
    """The innermost pid of a /proc/PID/status text (None without an NSpid line: kernels < 4.1)."""
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            fields = line[6:].split()
            return int(fields[-1]) if fields and fields[-1].isdigit() else None
    return None


def cgroup_path(text: str) -> str | None:
    """The process's cgroup from /proc/PID/cgroup: the v2 entry ("0::/path") when it is not the root,
    else the first v1 hierarchy placing it somewhere other than the root (hybrid hosts keep
    containers in the v1 hierarchies and leave v2 at "/"), preferring name=systemd."""
    v2: str | None = None
    v1: list[tuple[str, str]] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":
            v2 = path
        elif path and path != "/":
            v1.append((controllers, path))
    if v2 and v2 != "/":
        return v2
    if v1:
        return min(v1, key=lambda cp: cp[0] != "name=systemd")[1]  # min is stable: first wins a tie
    return v2


def safe_path(path: str) -> str:
    clean = _SAFE.sub("?", path)
    # The tail names the container: keep it when cutting.
    return clean if len(clean) <= MAX_PATH else "..." + clean[-(MAX_PATH - 3):]


def parse_container(path: str) -> dict[str, Any] | None:
    """{"id", "runtime", "cgroup"[, "pod"]} when a container runtime named this cgroup path, else None."""
    components = [c for c in path.split("/") if c]
    pod = next((m.group(1).replace("_", "-") for c in components if (m := _POD.search(c))), None)
    found: tuple[str, str] | None = None
    for i in range(len(components) - 1, -1, -1):
        comp = components[i]
        for rule, runtime in _COMPONENT_RULES:
            if m := rule.match(comp):
                found = (runtime, m.group(1))
                break
        if found:
            break
        if (m := _BARE_ID.match(comp)) and len(m.group(1)) == 64 and i > 0:
            parent = components[i - 1]
            if parent == "docker":
                found = ("docker", m.group(1))
            elif pod is not None and _POD.search(parent):  # cgroupfs-driver kubelet: .../pod<uid>/<id>
                found = ("kubernetes", m.group(1))
            if found:
                break
    if found is None:
        return None
    out: dict[str, Any] = {"id": found[1], "runtime": found[0], "cgroup": safe_path(path)}
    if pod is not None:
        out["pod"] = pod
    return out


def identity(pid: int) -> dict[str, Any]:
    """{"nspid": n} when it differs from pid, {"container": {...}} when in a container; {} otherwise
    (including a process that has gone or cannot be read)."""
    out: dict[str, Any] = {}
    status = _read(f"/proc/{pid}/status", MAX_STATUS)
    if status is not None:
        ns = parse_nspid(status)
        if ns is not None and ns != pid:
            out["nspid"] = ns
    text = _read(f"/proc/{pid}/cgroup", MAX_CGROUP)
    if text is not None and (path := cgroup_path(text)) is not None:
        container = parse_container(path)
        if container is not None:
            out["container"] = container
    return out
