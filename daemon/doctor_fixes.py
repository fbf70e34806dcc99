"""What `accept-watch doctor` tells a user to run when a check fails: pure logic over host facts.

The facts (distribution, kernel release, whether apt knows a headers package, ...) are gathered by
doctor.py; everything here is a function of them, so the advice is unit-tested without the host.
Commands are what root runs (doctor prefixes nothing: `sudo` is the user's business).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from accept_watch.probes.environment import Check

# Debian's architecture names for the machines Debian's generic headers package is named after.
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "ppc64le": "ppc64el",
            "s390x": "s390x", "riscv64": "riscv64", "i686": "i386"}


@dataclass(frozen=True)
class HostFacts:
    release: str  # uname -r
    machine: str  # uname -m
    distro: str  # /etc/os-release ID, or the first Debian-family word of ID_LIKE ("" unknown)
    apt: bool  # apt-get is present
    headers_in_apt: bool | None  # apt's lists have linux-headers-<release>; None: not asked


def uses_apt(f: HostFacts) -> bool:
    return f.apt and f.distro in ("debian", "ubuntu")


def bcc_fix(f: HostFacts, foreign_bcc: bool = False) -> str:
    if foreign_bcc:
        # PyPI's "bcc" shadows the system's BCC in this environment.
        return "pip uninstall bcc (in accept-watch's environment), then apt-get install python3-bpfcc"
    if uses_apt(f):
        return "apt-get install python3-bpfcc"
    return "install your distribution's BCC Python bindings (Fedora: dnf install python3-bcc)"


def headers_fix(f: HostFacts) -> str:
    build = f"/lib/modules/{f.release}/build"
    if not uses_apt(f):
        return f"install the headers of kernel {f.release} ({build}/include/generated/autoconf.h must exist)"
    if f.headers_in_apt is not False:
        return f"apt-get install linux-headers-{f.release}"
    # A kernel without its own headers package (custom, backports gone, a cloud build): BCC only has
    # to compile; every struct offset accept-watch uses comes from the running kernel's BTF.
    if f.distro == "ubuntu":
        generic, pattern = "linux-headers-generic", "/usr/src/linux-headers-*-generic"
    else:
        arch = DEB_ARCH.get(f.machine, f.machine)
        generic, pattern = f"linux-headers-{arch}", f"/usr/src/linux-headers-*-{arch}"
    return (f"apt-get install {generic} && ln -sfn \"$(ls -d {pattern} | sort -V | tail -n 1)\" {build}"
            f" (no linux-headers-{f.release} package exists; offsets come from BTF, so nearby headers do)")


def mount_fix(fstype: str, path: str) -> str:
    return f"mount -t {fstype} {fstype} {path}"


def privileges_fix(missing: Iterable[str]) -> str:
    return (f"run as root (sudo accept-watch ...), or grant {' and '.join(missing)} "
            "(deploy/systemd/accept-watch.service lists the capabilities a service needs)")


BTF_FIX = ("boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's since 11, Ubuntu's since 20.10): "
           "accept-watch reads struct offsets from /sys/kernel/btf/vmlinux")


def lockdown_check(mode: str | None) -> Check:
    """Lockdown 'confidentiality' forbids BPF reading kernel memory, which every probe does;
    'integrity' (Secure Boot's default on Debian and Ubuntu) only forbids writing it."""
    if mode == "confidentiality":
        return Check("lockdown", False, "confidentiality: BPF may not read kernel memory",
                     fix="boot without lockdown=confidentiality on the kernel command line", required=True)
    return Check("lockdown", None, mode or "not available (securityfs not mounted or no LSM)")


PARANOID_FILE = "/etc/sysctl.d/50-accept-watch.conf"


def paranoid_check(value: int | None, sys_admin: bool) -> Check:
    """kernel.perf_event_paranoid above 2 means something only with a distribution patch (Debian's, 3 by
    default; upstream treats it as 2): perf_event_open(), which attaches tracepoints, then wants
    CAP_SYS_ADMIN instead of CAP_PERFMON. Full root has it; a service limited to CAP_BPF + CAP_PERFMON
    (deploy/systemd) needs 2. A warning, not required: the probe checks below try attaching for real."""
    name = "perf_event_paranoid"
    if value is None:
        return Check(name, None, "not readable")
    if value <= 2:
        return Check(name, True, f"{value}: CAP_PERFMON is enough to attach tracepoints")
    if sys_admin:
        return Check(name, None, f"{value}: tracepoints may need CAP_SYS_ADMIN (this process has it; "
                     "a service with only CAP_BPF + CAP_PERFMON needs 2)")
    return Check(name, False, f"{value}: perf_event_open() may need CAP_SYS_ADMIN at this level",
                 fix=f"sysctl -w kernel.perf_event_paranoid=2, and to keep it: "
                     f"echo 'kernel.perf_event_paranoid = 2' > {PARANOID_FILE}")


def exit_status(checks: Iterable[Check]) -> int:
    """1 when a required check failed (accept-watch cannot run here as it is), else 0."""
    return 1 if any(c.ok is False and c.required for c in checks) else 0


def failed_required(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if c.ok is False and c.required]
