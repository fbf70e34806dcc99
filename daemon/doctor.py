"""`accept-watch doctor`: what this machine allows, and which probe `--probe auto` would use.

Every hook is tried for real (compiled, loaded, attached with nothing tracked, detached): kernels
and feature flags disagree (BPF.support_kfunc() says yes where fexit programs are refused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from accept_watch.probes import environment
from accept_watch.probes.environment import Check
from accept_watch.probes.records import PROBE_ORDER

from .doctor_fixes import (
    BTF_FIX,
    HostFacts,
    bcc_fix,
    exit_status,
    failed_required,
    headers_fix,
    lockdown_check,
    mount_fix,
    paranoid_check,
    privileges_fix,
)
from .sanitize import clean


def _config_flag(cfg: dict[str, str], name: str) -> Check:
    if not cfg:
        return Check(name, None, "kernel config not readable (/proc/config.gz, /boot/config-*)")
    value = cfg.get(name)
    # Not required: each flag serves one probe path, and "auto would use" says if any path works.
    return Check(name, value in ("y", "m"), f"{name}={value or 'not set'}")


def _os_release() -> dict[str, str]:
    out = {}
    try:
        text = Path("/etc/os-release").read_text()[:65536]
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


def host_facts(ask_apt: bool) -> HostFacts:
    osr = _os_release()
    words = [osr.get("ID", ""), *osr.get("ID_LIKE", "").split()]
    distro = next((w for w in words if w in ("debian", "ubuntu")), osr.get("ID", ""))
    apt = shutil.which("apt-get") is not None
    known = None
    if ask_apt and apt and shutil.which("apt-cache"):
        try:
            package = f"linux-headers-{os.uname().release}"
            proc = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                                  capture_output=True, timeout=30)
            known = proc.returncode == 0 and bool(proc.stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            known = None
    return HostFacts(os.uname().release, platform.machine(), distro, apt, known)


def _paranoid() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip())
    except (OSError, ValueError):
        return None


def _tracing_check(privileged: bool) -> list[Check]:
    wanted = ((environment.TRACEFS, "tracefs"), (environment.DEBUGFS, "debugfs"))
    absent = [(p, t) for p, t in wanted if not environment._is_mounted(p, t)]
    if absent and privileged:
        try:  # what the CLI does at start anyway: mount them
            did = environment.ensure_tracing_mounts()
            return [Check("tracefs/debugfs", True, "; ".join(did) or "mounted")]
        except environment.EnvironmentProblem as exc:
            return [Check("tracefs/debugfs", False, str(exc), fix=mount_fix(*_first(absent)), required=True)]
    if absent:
        fix = " && ".join(mount_fix(t, str(p)) for p, t in absent)
        return [Check("tracefs/debugfs", False, f"not mounted: {', '.join(str(p) for p, _ in absent)}",
                      fix=fix, required=True)]
    return [Check("tracefs/debugfs", True, f"{environment.TRACEFS} and {environment.DEBUGFS} mounted")]


def _first(absent: list[tuple[Path, str]]) -> tuple[str, str]:
    path, fstype = absent[0]
    return fstype, str(path)


def gather_checks() -> list[Check]:
    checks: list[Check] = []
    checks.append(Check("python", None, f"{platform.python_version()} in {sys.prefix}"))
    missing = environment.missing_privileges()
    have = "root / CAP_BPF+CAP_PERFMON present"
    checks.append(Check("privileges", not missing, have if not missing else f"missing {', '.join(missing)}",
                        fix=privileges_fix(missing) if missing else "", required=True))
    checks.append(Check("kernel", None, f"{platform.release()} ({platform.machine()})"))
    btf = environment.BTF_PATH.exists()
    checks.append(Check("BTF", btf, str(environment.BTF_PATH) if btf else "no /sys/kernel/btf/vmlinux",
                        fix="" if btf else BTF_FIX, required=True))
    cfg = environment.kernel_config()
    checks.append(_config_flag(cfg, "CONFIG_KPROBES"))  # kretprobe path
    checks.append(_config_flag(cfg, "CONFIG_FTRACE_SYSCALLS"))  # the syscalls:* tracepoints
    checks.append(lockdown_check(environment.lockdown_mode()))
    sys_admin = bool(environment.effective_capabilities() & 1 << environment.CAP_SYS_ADMIN)
    checks.append(paranoid_check(_paranoid(), sys_admin))
    headers = environment.kernel_headers()
    facts = host_facts(ask_apt=headers is None)
    checks.append(Check("kernel headers", headers is not None,
                        headers or f"none under /lib/modules/{facts.release}/build",
                        fix="" if headers else headers_fix(facts), required=True))
    checks.append(_bcc_check(facts))
    checks += _tracing_check(privileged=not missing)
    if missing or not btf or headers is None or not checks[-2].ok or not checks[-1].ok:
        return checks  # the probe checks below would only repeat what is already failing
    return checks + _probe_checks()


def _bcc_check(facts: HostFacts) -> Check:
    from accept_watch.probes.bccimport import BccMissing, import_bcc

    try:
        bcc, how = import_bcc()
    except BccMissing as exc:
        return Check("BCC", False, str(exc), fix=bcc_fix(facts, foreign_bcc="not BCC" in str(exc)),
                     required=True)
    return Check("BCC", True, f"{getattr(bcc, '__version__', '?')}, {how}")


def _probe_checks() -> list[Check]:
    from accept_watch.probes.btf import BtfError
    from accept_watch.probes.kernel import AcceptProbes, ProbeError
    from accept_watch.probes.offsets import load_layout

    out: list[Check] = []
    try:
        layout = load_layout(str(environment.BTF_PATH))
    except BtfError as exc:
        return [Check("BTF offsets", False, str(exc), required=True)]
    out.append(Check("BTF offsets", True, f"{len(layout.defines)} offsets/sizes resolved"))
    out.append(Check("inet_csk_accept", layout.accept_proto != "unknown", layout.accept_proto_text))
    # Either way works; reading the saved registers spares a program on every accept() entry.
    out.append(Check("listener at exit", None, layout.syscall_arg1_text))
    chosen = None
    for kind in PROBE_ORDER:
        try:
            with AcceptProbes(layout) as probes:
                probes.attach(kind, pids=[], ports=[])
            out.append(Check(f"probe {kind}", True, "compiled, loaded, attached, detached"))
            chosen = chosen or kind
        except ProbeError as exc:
            out.append(Check(f"probe {kind}", False, str(exc)))
    out.append(Check("ring buffer", True, "BPF_MAP_TYPE_RINGBUF created with the program"))
    out.append(Check("auto would use", chosen is not None, str(chosen) if chosen else "nothing: cannot run",
                     fix="" if chosen else "see the failed probe checks above", required=True))
    return out


def run_doctor(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="accept-watch doctor",
                                description="Check what this kernel allows and which probe would be used.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    checks = gather_checks()
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            mark = {True: "ok  ", False: "FAIL" if c.required else "warn", None: "info"}[c.ok]
            print(f"[{mark}] {c.name:<22} {clean(c.detail)}")
            if c.ok is False and c.fix:
                print(f"       {'':<22} fix: {clean(c.fix)}")
    failed = failed_required(checks)
    if failed:
        print(f"accept-watch doctor: cannot run here: {', '.join(c.name for c in failed)} "
              "(each failed check above says how to fix it)", file=sys.stderr)
    elif not any(c.name == "auto would use" and c.ok for c in checks):  # cannot happen; never exit 0 then
        print("accept-watch doctor: no probe can be attached here", file=sys.stderr)
        return 1
    return exit_status(checks)
