"""What the kernel and this process allow, checked without bcc: privileges, BTF, tracefs, config.

Used by the CLI's early checks (one-line errors before anything is attached) and by `doctor`.
"""

from __future__ import annotations

import gzip
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

# ACCEPT_WATCH_BTF points at another BTF blob (a kernel whose BTF lives elsewhere; tests).
BTF_PATH = Path(os.environ.get("ACCEPT_WATCH_BTF", "/sys/kernel/btf/vmlinux"))
TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS = Path("/sys/kernel/debug")

# Capability bits (include/uapi/linux/capability.h).
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


class EnvironmentProblem(Exception):
    """A one-line reason accept-watch cannot run here."""


def effective_capabilities(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def missing_privileges() -> list[str]:
    """Capabilities needed to load and attach tracing BPF programs that this process lacks."""
    caps = effective_capabilities()
    if caps & (1 << CAP_SYS_ADMIN):
        return []
    needed = ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON"))
    return [name for bit, name in needed if not caps & (1 << bit)]


def require_privileges() -> None:
    missing = missing_privileges()
    if missing:
        raise EnvironmentProblem(
            f"missing {' and '.join(missing)} (run as root, e.g. sudo accept-watch ...)"
        )


def require_btf() -> None:
    if not BTF_PATH.exists():
        raise EnvironmentProblem(
            f"{BTF_PATH} not found: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF); "
            "accept-watch reads struct offsets from it"
        )


def _is_mounted(path: Path, fstype: str) -> bool:
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == str(path) and parts[2] == fstype:
                return True
    except OSError:
        return False
    return False


def ensure_tracing_mounts() -> list[str]:
    """Mount tracefs and debugfs when absent (BCC reads tracepoint formats there). Returns what it did."""
    done = []
    for path, fstype in ((TRACEFS, "tracefs"), (DEBUGFS, "debugfs")):
        if _is_mounted(path, fstype):
            continue
        proc = subprocess.run(["mount", "-t", fstype, fstype, str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise EnvironmentProblem(f"cannot mount {fstype} on {path}: {proc.stderr.strip()}")
        done.append(f"mounted {fstype} on {path}")
    return done


# Where BCC creates a kprobe (libbpf.c, bpf_attach_probe): the kprobe PMU of perf_event_open, else a
# kprobe_events file in tracefs (at either of its mount points, depending on the BCC version).
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe/type")
KPROBE_EVENTS = (TRACEFS / "kprobe_events", DEBUGFS / "tracing" / "kprobe_events")
TRACEFS_EVENTS = (TRACEFS / "events", DEBUGFS / "tracing" / "events")


def kprobes_missing(pmu: Path = KPROBE_PMU, events: tuple[Path, ...] = KPROBE_EVENTS,
                    tracefs: tuple[Path, ...] = TRACEFS_EVENTS) -> str | None:
    """Why no kprobe can be created here (kernel built without CONFIG_KPROBES), or None when one might.

    Only says so when it is certain: tracefs mounted (its events directory present) and neither way BCC
    creates a kprobe exists. Trying anyway costs more than it looks: the kretprobe attempt attaches the
    sys_enter stash first and detaches it on failure, and each detach waits for an RCU grace period."""
    if pmu.exists() or any(path.exists() for path in events) or not any(path.is_dir() for path in tracefs):
        return None
    return f"this kernel has no kprobes (no {pmu.parent}, no kprobe_events in tracefs)"


def kernel_config() -> dict[str, str]:
    """The running kernel's config (/proc/config.gz or /boot/config-*), {} when unavailable."""
    text = ""
    proc_cfg = Path("/proc/config.gz")
    boot_cfg = Path(f"/boot/config-{os.uname().release}")
    try:
        if proc_cfg.exists():
            text = gzip.decompress(proc_cfg.read_bytes()).decode()
        elif boot_cfg.exists():
            text = boot_cfg.read_text()
    except OSError:
        return {}
    cfg = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            cfg[key] = value
    return cfg


def lockdown_mode() -> str | None:
    path = Path("/sys/kernel/security/lockdown")
    if not path.exists() and os.geteuid() == 0 and not _is_mounted(path.parent, "securityfs"):
        # securityfs is often unmounted on minimal VMs; mounting it only exposes read-only state.
        subprocess.run(["mount", "-t", "securityfs", "securityfs", str(path.parent)], capture_output=True)
    try:
        text = path.read_text()
    except OSError:
        return None
    # "none [integrity] confidentiality": the bracketed word is in force.
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else text.strip()


def kernel_headers() -> str | None:
    """Where BCC will find kernel headers, or None."""
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if (build / "include/generated/autoconf.h").exists():
        return str(build.resolve())
    return None


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: informational
    detail: str
    fix: str = ""  # the command (or step) that fixes a failed check
    required: bool = False  # a failure means accept-watch cannot run here (doctor exits non-zero)
