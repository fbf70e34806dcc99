"""The systemd half of guest_check.py: deploy/systemd/accept-watch.service under the guest's real
systemd, watching a gunicorn service that runs as www-data (another user: the realistic case, and the
one that needs CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH)."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

from guest_check import APP_PORT, METRICS, PAYLOAD, app_counts, log, make_requests, run, tail, wait_http

UNIT_DIR = Path("/etc/systemd/system")
DROPIN = UNIT_DIR / "accept-watch.service.d"
APP_LOG = Path("/run/ic-gunicorn/app.log")
PIDFILE = "/run/ic-gunicorn/gunicorn.pid"
CONFIG = Path("/etc/accept-watch/serve.toml")
EXPORT = Path("/var/lib/accept-watch/web.json")  # export_dir below, <server>.json
# The unit runs as shipped: `accept-watch serve --config /etc/accept-watch/serve.toml`, the production
# mode; this is the file a user writes (README "Production"), one target found through its pid file.
SERVE_TOML = f"""# written by the install check
listen = "{METRICS}"
export_dir = "/var/lib/accept-watch"

[[target]]
name = "web"
pidfile = "{PIDFILE}"
"""
CAPS = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24,
        "CAP_PERFMON": 38, "CAP_BPF": 39}
GUNICORN_UNIT = f"""[Unit]
Description=the server accept-watch watches in the install check
[Service]
User=www-data
RuntimeDirectory=ic-gunicorn
Environment=IC_APP_LOG={APP_LOG}
ExecStart=/usr/bin/gunicorn --workers 3 --bind 127.0.0.1:{APP_PORT} --pid {PIDFILE} --chdir {PAYLOAD} app:app
"""


def declared_caps(unit_text: str) -> list[str]:
    m = re.search(r"^CapabilityBoundingSet=(.*)$", unit_text, re.M)
    return m.group(1).split() if m else []


def mask(names: list[str]) -> int:
    return sum(1 << CAPS[n] for n in names)


def caps_of(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Uid"):
            fields[key] = value.strip()
    return fields


def names_of(hexmask: str) -> list[str]:
    value = int(hexmask, 16)
    known = [n for n, bit in CAPS.items() if value & (1 << bit)]
    unknown = value & ~mask(list(CAPS))
    return known + ([f"other bits {unknown:#x}"] if unknown else [])


def systemctl(*args: str) -> subprocess.CompletedProcess:
    return run(["systemctl", *args], timeout=300)


def prop(name: str) -> str:
    return systemctl("show", "-p", name, "--value", "accept-watch").stdout.strip()


def journal(since: float) -> str:
    cmd = ["journalctl", "-u", "accept-watch", "-o", "cat", "--no-pager", f"--since=@{since:.0f}"]
    return run(cmd).stdout


def metrics_counts(text: str, server: str = "web") -> dict[str, int]:
    out = {}
    for m in re.finditer(r'^accept_watch_worker_accepts_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        if f'server="{server}"' not in m.group(1):
            continue
        pid = re.search(r'pid="([^"]+)"', m.group(1))
        if pid and pid.group(1).isdigit() and float(m.group(2)) > 0:
            out[pid.group(1)] = int(float(m.group(2)))
    return out


def start_and_count(extra: str, n: int, attach_timeout: float = 600) -> dict:
    """Start the unit with drop-in `extra`, wait for attach, make n requests, compare /metrics with the
    app's log (the delta over this run). Returns what happened."""
    (DROPIN / "20-experiment.conf").write_text("[Service]\nRestart=no\n" + extra)
    systemctl("daemon-reload")
    since = time.time() - 1
    before = app_counts(APP_LOG) if APP_LOG.exists() else {}
    systemctl("start", "accept-watch")
    out: dict = {"dropin": extra.strip(), "works": False}
    deadline = time.monotonic() + attach_timeout
    while time.monotonic() < deadline:
        text = journal(since)
        if "attached in" in text and "serving /metrics" in text:
            break
        if prop("ActiveState") in ("failed", "inactive"):
            break
        time.sleep(1)
    out["active"] = prop("ActiveState")
    pid = int(prop("MainPID") or 0)
    if out["active"] == "active" and pid:
        out["caps"] = caps_of(pid)
        make_requests(n)
        time.sleep(3)
        with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=30) as r:
            body = r.read().decode()
        after = app_counts(APP_LOG)
        expected = {p: c - before.get(p, 0) for p, c in after.items() if c - before.get(p, 0)}
        got = metrics_counts(body)
        series = len([ln for ln in body.splitlines() if ln.startswith("accept_watch_")])
        out.update(metrics=got, app=expected, works=got == expected and sum(expected.values()) == n,
                   metrics_series=series, metrics_servers=sorted(set(re.findall(r'server="([^"]+)"', body))))
    text = journal(since)
    out["journal_tail"] = tail(text, 700)
    out["ansi_in_journal"] = "\x1b" in text
    systemctl("stop", "accept-watch")
    systemctl("reset-failed", "accept-watch")
    return out


def systemd_check(n: int) -> dict:
    unit_text = (PAYLOAD / "accept-watch.service").read_text()
    declared = declared_caps(unit_text)
    out: dict = {"declared": declared, "problems": [], "experiments": []}
    (UNIT_DIR / "accept-watch.service").write_text(unit_text)
    (UNIT_DIR / "ic-gunicorn.service").write_text(GUNICORN_UNIT)
    DROPIN.mkdir(exist_ok=True)
    CONFIG.parent.mkdir(exist_ok=True)
    CONFIG.write_text(SERVE_TOML)
    out["exec_start"] = next((ln for ln in unit_text.splitlines() if ln.startswith("ExecStart=")), "")
    if "accept-watch serve --config" not in out["exec_start"]:
        out["problems"].append(f"the unit does not start the daemon mode: {out['exec_start']!r}")
    systemctl("daemon-reload")
    verify = run(["systemd-analyze", "verify", str(UNIT_DIR / "accept-watch.service")])
    out["analyze_verify"] = tail(verify.stdout + verify.stderr, 600)
    sec = run(["systemd-analyze", "security", "--no-pager", "accept-watch.service"])
    out["analyze_security"] = next((ln.strip() for ln in sec.stdout.splitlines() if "Overall exposure" in ln),
                                   "")
    systemctl("start", "ic-gunicorn")
    wait_http(f"http://127.0.0.1:{APP_PORT}/", 300)

    # Debian's kernels default to perf_event_paranoid=3, where (Debian's patch) perf_event_open() wants
    # CAP_SYS_ADMIN rather than CAP_PERFMON: first the unit at the kernel's default, then with the
    # sysctl file shipped beside the unit (2, the upstream default), as the README says to install it.
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
    out["perf_event_paranoid_default"] = paranoid.read_text().strip()
    log(f"systemd: the unit at the default perf_event_paranoid={out['perf_event_paranoid_default']}")
    res = start_and_count("", n, attach_timeout=400)
    res["without"] = f"the sysctl file (perf_event_paranoid={out['perf_event_paranoid_default']})"
    out["experiments"].append(res)
    sysctl_file = Path("/etc/sysctl.d/50-accept-watch.conf")
    sysctl_file.write_text((PAYLOAD / "accept-watch-sysctl.conf").read_text())
    applied = run(["sysctl", "-p", str(sysctl_file)])
    out["sysctl"] = tail(applied.stdout + applied.stderr, 200)
    out["perf_event_paranoid"] = paranoid.read_text().strip()

    log("systemd: the unit as shipped (with the sysctl file)")
    base = start_and_count("", n)
    out["shipped"] = base
    if not base["works"]:
        out["problems"].append(f"the shipped unit did not count exactly: {base}")
    caps = base.get("caps", {})
    want = f"{mask(declared):016x}"
    if caps.get("CapEff") != want or caps.get("CapPrm") != want or caps.get("CapBnd") != want:
        out["problems"].append(f"capabilities {caps} != declared {declared} ({want})")
    if caps.get("CapAmb") != "0000000000000000" or caps.get("NoNewPrivs") != "1":
        out["problems"].append(f"ambient caps or no_new_privs not as declared: {caps}")
    out["caps_names"] = names_of(caps.get("CapEff", "0"))
    if base.get("ansi_in_journal"):
        out["problems"].append("ANSI escapes in the journal")
    out["export_written"] = EXPORT.exists() and EXPORT.stat().st_size > 0
    if not out["export_written"]:
        out["problems"].append("no export in the StateDirectory after stop")

    # Each declared capability is needed: without it, the service must not count correctly.
    for cap in declared:
        rest = " ".join(c for c in declared if c != cap)
        log(f"systemd: without {cap}")
        dropin = f"CapabilityBoundingSet=\nCapabilityBoundingSet={rest}\n"
        res = start_and_count(dropin, n, attach_timeout=400)
        res["without"] = cap
        out["experiments"].append(res)
        if res["works"]:
            out["problems"].append(f"{cap} is declared but the service counts exactly without it")
    # Memlock: kernels >= 5.11 charge BPF memory to the cgroup, so the unit's LimitMEMLOCK only matters
    # before that; shown here by a run with a small limit.
    log("systemd: LimitMEMLOCK=64K")
    res = start_and_count("LimitMEMLOCK=64K\n", n, attach_timeout=400)
    res["without"] = "LimitMEMLOCK=infinity (64K instead)"
    out["experiments"].append(res)
    systemctl("stop", "ic-gunicorn")
    return out
