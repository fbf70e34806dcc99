"""`accept-watch doctor`'s advice (pure logic over host facts) and its BCC lookup, without the host's state.

The advice is the exact command a user copies: these tests pin it per distribution and situation.
doctor's real run on this host is in test_kernel_probes.py; in fresh Debian 12/13 userlands it is in
`make install-check` (scripts/install-check), which runs the printed commands and doctor again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from accept_watch.daemon import doctor
from accept_watch.daemon.doctor_fixes import (
    HostFacts,
    bcc_fix,
    exit_status,
    headers_fix,
    lockdown_check,
    mount_fix,
    paranoid_check,
    privileges_fix,
)
from accept_watch.probes import bccimport
from accept_watch.probes.environment import Check

DEBIAN = HostFacts("6.1.0-57-amd64", "x86_64", "debian", apt=True, headers_in_apt=True)


def test_headers_fix_names_the_running_kernels_package() -> None:
    assert headers_fix(DEBIAN) == "apt-get install linux-headers-6.1.0-57-amd64"
    # apt not asked (None) still gives the package named after the release: the usual case.
    unasked = HostFacts("6.12.57+deb13-amd64", "x86_64", "debian", True, None)
    assert headers_fix(unasked) == "apt-get install linux-headers-6.12.57+deb13-amd64"


def test_headers_fix_without_a_package_for_this_kernel_uses_the_generic_headers() -> None:
    custom = HostFacts("6.18.44-custom", "x86_64", "debian", True, False)
    fix = headers_fix(custom)
    assert fix.startswith("apt-get install linux-headers-amd64 && ln -sfn ")
    newest = '"$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)"'
    assert f"{newest} /lib/modules/6.18.44-custom/build" in fix
    arm = HostFacts("6.1.0-57-arm64", "aarch64", "debian", True, False)
    assert headers_fix(arm).startswith("apt-get install linux-headers-arm64 ")
    ubuntu = HostFacts("6.8.0-1-custom", "x86_64", "ubuntu", True, False)
    assert headers_fix(ubuntu).startswith("apt-get install linux-headers-generic ")


def test_non_apt_systems_get_a_step_not_an_apt_command() -> None:
    fedora = HostFacts("6.11.4-301.fc41.x86_64", "x86_64", "fedora", apt=False, headers_in_apt=None)
    assert "apt-get" not in headers_fix(fedora)
    assert "/lib/modules/6.11.4-301.fc41.x86_64/build/include/generated/autoconf.h" in headers_fix(fedora)
    assert bcc_fix(fedora).endswith("dnf install python3-bcc)")
    # A Debian-family ID with no apt-get (a stripped container) is not told to run apt-get either.
    assert "apt-get" not in bcc_fix(HostFacts("6.1.0-57-amd64", "x86_64", "debian", False, None))


def test_bcc_fix() -> None:
    assert bcc_fix(DEBIAN) == "apt-get install python3-bpfcc"
    assert bcc_fix(DEBIAN, foreign_bcc=True).startswith("pip uninstall bcc ")


def test_mount_and_privilege_fixes() -> None:
    assert mount_fix("tracefs", "/sys/kernel/tracing") == "mount -t tracefs tracefs /sys/kernel/tracing"
    assert privileges_fix(["CAP_BPF", "CAP_PERFMON"]).startswith(
        "run as root (sudo accept-watch ...), or grant CAP_BPF and CAP_PERFMON ")


def test_lockdown_only_confidentiality_stops_us() -> None:
    conf = lockdown_check("confidentiality")
    assert conf.ok is False and conf.required and "lockdown=confidentiality" in conf.fix
    for mode in ("integrity", "none", None):
        c = lockdown_check(mode)
        assert c.ok is None and not c.required


def test_perf_event_paranoid_above_2_is_flagged_only_without_cap_sys_admin() -> None:
    assert paranoid_check(2, sys_admin=False).ok is True
    assert paranoid_check(-1, sys_admin=False).ok is True
    assert paranoid_check(3, sys_admin=True).ok is None
    debian = paranoid_check(3, sys_admin=False)
    assert debian.ok is False and not debian.required  # the probe checks decide; this says why
    assert debian.fix == ("sysctl -w kernel.perf_event_paranoid=2, and to keep it: "
                          "echo 'kernel.perf_event_paranoid = 2' > /etc/sysctl.d/50-accept-watch.conf")
    assert paranoid_check(None, sys_admin=False).ok is None


def test_exit_status_counts_only_required_failures() -> None:
    warn = Check("CONFIG_KPROBES", False, "not set")
    info = Check("kernel", None, "6.1")
    assert exit_status([warn, info, Check("BCC", True, "0.26")]) == 0
    assert exit_status([warn, Check("BCC", False, "missing", fix="apt-get install python3-bpfcc",
                                    required=True)]) == 1


def test_doctor_prints_each_fix_and_exits_1_when_something_required_is_missing(monkeypatch, capsys) -> None:
    checks = [Check("python", None, "3.13"),
              Check("kernel headers", False, "none", fix="apt-get install linux-headers-6.1.0-57-amd64",
                    required=True),
              Check("BCC", False, "not installed", fix="apt-get install python3-bpfcc", required=True),
              Check("CONFIG_KPROBES", False, "CONFIG_KPROBES=not set")]
    monkeypatch.setattr(doctor, "gather_checks", lambda: checks)
    assert doctor.run_doctor([]) == 1
    out, err = capsys.readouterr()
    assert "fix: apt-get install linux-headers-6.1.0-57-amd64" in out
    assert "fix: apt-get install python3-bpfcc" in out
    assert "[warn] CONFIG_KPROBES" in out and "[FAIL] BCC" in out
    assert err.strip() == ("accept-watch doctor: cannot run here: kernel headers, BCC "
                           "(each failed check above says how to fix it)")
    assert doctor.run_doctor(["--json"]) == 1
    as_json = json.loads(capsys.readouterr().out)
    assert as_json[2] == {"name": "BCC", "ok": False, "detail": "not installed",
                          "fix": "apt-get install python3-bpfcc", "required": True}


def test_doctor_never_exits_0_without_a_usable_probe(monkeypatch, capsys) -> None:
    monkeypatch.setattr(doctor, "gather_checks", lambda: [Check("BCC", True, "0.26")])
    assert doctor.run_doctor([]) == 1
    assert "no probe can be attached" in capsys.readouterr().err


def test_tracing_check_gives_the_mount_commands_when_unprivileged(monkeypatch) -> None:
    monkeypatch.setattr(doctor.environment, "_is_mounted", lambda path, fstype: False)
    (c,) = doctor._tracing_check(privileged=False)
    assert c.ok is False and c.required
    assert c.fix == ("mount -t tracefs tracefs /sys/kernel/tracing && "
                     "mount -t debugfs debugfs /sys/kernel/debug")


# ------------------------------------------------------------------ the BCC lookup


def _fake_bcc(root: Path, body: str) -> Path:
    pkg = root / "dist-packages" / "bcc"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    (pkg / "version.py").write_text("__version__ = '9.9.9'\n")
    for p in (root / "dist-packages", pkg, pkg / "__init__.py"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return pkg


def _lookup(pkg: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """import_bcc() in a fresh interpreter that cannot import any bcc itself (-I: no site-packages
    of ours, no user site), with the accept_watch package on the path."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib.util as u; "
            "spec = u.spec_from_file_location('bi', sys.argv[2]); m = u.module_from_spec(spec); "
            "spec.loader.exec_module(m); bcc, how = m.import_bcc(); print(bcc.__version__, bcc.BPF, how)")
    here = Path(bccimport.__file__)
    return subprocess.run([sys.executable, "-I", "-S", "-c", code, str(cwd), str(here)], capture_output=True,
                          text=True, env={"ACCEPT_WATCH_SYSTEM_BCC": str(pkg), "PATH": os.environ["PATH"]},
                          cwd=cwd, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="the trust check wants root-owned files")
def test_plain_venv_loads_only_the_system_bcc_package(tmp_path) -> None:
    pkg = _fake_bcc(tmp_path, "from .version import __version__\nBPF = 'the-BPF-class'\n")
    proc = _lookup(pkg, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"9.9.9 the-BPF-class loaded from {pkg} "
                                   "(this Python environment does not see system site-packages)")


@pytest.mark.skipif(os.geteuid() != 0, reason="the trust check wants root-owned files")
def test_system_bcc_writable_by_others_is_refused(tmp_path) -> None:
    pkg = _fake_bcc(tmp_path, "BPF = 1\n")
    (pkg / "__init__.py").chmod(0o666)
    proc = _lookup(pkg, tmp_path)
    assert proc.returncode == 1
    assert f"BccMissing: not loading the system bcc: {pkg}/__init__.py is not owned by root or is writable" \
        in proc.stderr


def test_no_bcc_anywhere_names_the_package(tmp_path) -> None:
    proc = _lookup(tmp_path / "nothing-here", tmp_path)
    assert proc.returncode == 1
    assert ("BccMissing: BCC's Python module is not installed (Debian/Ubuntu package python3-bpfcc)"
            in proc.stderr)


def test_a_bcc_without_BPF_is_called_out(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "site"
    (fake / "bcc").mkdir(parents=True)
    (fake / "bcc" / "__init__.py").write_text("# PyPI's unrelated bcc\n")
    monkeypatch.syspath_prepend(str(fake))
    real = sys.modules.pop("bcc", None)
    try:
        with pytest.raises(bccimport.BccMissing, match="is not BCC"):
            bccimport.import_bcc()
    finally:  # the real bcc (or none) back for the tests that follow
        sys.modules.pop("bcc", None)
        if real is not None:
            sys.modules["bcc"] = real
