"""`accept-watch doctor`: what this machine allows, and which probe `--probe auto` would use.

Every hook is tried for real (compiled, loaded, attached with nothing tracked, detached): kernels
and feature flags disagree (BPF.support_kfunc() says yes where fexit programs are refused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict

from accept_watch.probes import environment
from accept_watch.probes.environment import Check
from accept_watch.probes.records import PROBE_ORDER

from .sanitize import clean


def _config_flag(cfg: dict[str, str], name: str) -> Check:
    if not cfg:
        return Check(name, None, "kernel config not readable (/proc/config.gz, /boot/config-*)")
    value = cfg.get(name)
    return Check(name, value in ("y", "m"), f"{name}={value or 'not set'}")


def gather_checks() -> list[Check]:
    checks: list[Check] = []
    missing = environment.missing_privileges()
    have = "root / CAP_BPF+CAP_PERFMON present"
    checks.append(Check("privileges", not missing, have if not missing else f"missing {', '.join(missing)}"))
    checks.append(Check("kernel", None, f"{platform.release()} ({platform.machine()})"))
    btf = environment.BTF_PATH.exists()
    checks.append(Check("BTF", btf, str(environment.BTF_PATH) if btf else "no /sys/kernel/btf/vmlinux"))
    cfg = environment.kernel_config()
    checks.append(_config_flag(cfg, "CONFIG_KPROBES"))  # kretprobe path
    checks.append(_config_flag(cfg, "CONFIG_FTRACE_SYSCALLS"))  # the syscalls:* tracepoints
    lockdown = environment.lockdown_mode()
    checks.append(Check("lockdown", None, lockdown or "not available"))
    headers = environment.kernel_headers()
    checks.append(Check("kernel headers", headers is not None,
                        headers or f"none under /lib/modules/{os.uname().release}/build (run make setup)"))
    try:
        import bcc

        checks.append(Check("BCC", True, f"python3-bpfcc {getattr(bcc, '__version__', '?')}"))
    except ImportError:
        checks.append(Check("BCC", False, "python bcc module not importable (Debian python3-bpfcc)"))
        return checks
    if missing or not btf:
        return checks
    try:
        for did in environment.ensure_tracing_mounts():
            checks.append(Check("tracefs/debugfs", True, did))
    except environment.EnvironmentProblem as exc:
        checks.append(Check("tracefs/debugfs", False, str(exc)))
    return checks + _probe_checks()


def _probe_checks() -> list[Check]:
    from accept_watch.probes.btf import BtfError
    from accept_watch.probes.kernel import AcceptProbes, ProbeError
    from accept_watch.probes.offsets import load_layout

    out: list[Check] = []
    try:
        layout = load_layout(str(environment.BTF_PATH))
    except BtfError as exc:
        return [Check("BTF offsets", False, str(exc))]
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
    out.append(Check("auto would use", chosen is not None, str(chosen) if chosen else "nothing: cannot run"))
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
            mark = {True: "ok  ", False: "FAIL", None: "info"}[c.ok]
            print(f"[{mark}] {c.name:<22} {clean(c.detail)}")
    usable = any(c.name == "auto would use" and c.ok for c in checks)
    if not usable:
        print("accept-watch doctor: no probe can be attached here", file=sys.stderr)
    return 0 if usable else 1
