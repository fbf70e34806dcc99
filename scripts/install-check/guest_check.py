#!/usr/bin/python3
"""Runs inside an install-check guest (Debian 12 or 13 booted with systemd, root, no network), started
by the image's ic-driver.service with this run's payload mounted read-only on /opt/ic: the wheel, the
PyPI wheels of its dependencies, the systemd unit, the test app. Nothing else of the repository.

Install check: install the wheel twice (pipx into a plain venv, system-wide; and a venv made with
--system-site-packages), run `accept-watch doctor` (python3-bpfcc and the headers are absent: it must
name them and the commands), run those commands verbatim (apt installs from its cache), doctor again,
`--dry-run` on a gunicorn, then an exact count of Debian's gunicorn against the app's own per-pid log.
Systemd check: deploy/systemd/accept-watch.service under this systemd, watching a gunicorn service run
as www-data: /metrics must equal the app's log, the process must hold exactly the declared
capabilities, and each declared capability is shown needed by a run without it.

Each outcome is one console line "IC-RESULT <json>"; progress lines start with "IC-LOG".
Standard library only (this runs on the guest's own Python before anything is installed).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PAYLOAD = Path("/opt/ic")
WHEELHOUSE = PAYLOAD / "wheelhouse"
PIPX_BIN = Path("/usr/local/bin/accept-watch")  # pipx, system-wide, plain venv (bcc loaded by path)
VENV = Path("/opt/aw-venv")  # python3 -m venv --system-site-packages
OFFLINE = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
APP_PORT, METRICS = 8124, "127.0.0.1:9177"
N_CLI, N_SYSTEMD = 200, 120
CAP_NAMES = {21: "CAP_SYS_ADMIN", 19: "CAP_SYS_PTRACE", 2: "CAP_DAC_READ_SEARCH", 1: "CAP_DAC_OVERRIDE",
             24: "CAP_SYS_RESOURCE", 38: "CAP_PERFMON", 39: "CAP_BPF", 12: "CAP_NET_ADMIN"}


def emit(kind: str, **fields: object) -> None:
    print("IC-RESULT " + json.dumps({"kind": kind, **fields}, sort_keys=True), flush=True)


def log(msg: str) -> None:
    print(f"IC-LOG {msg}", flush=True)


def run(cmd: list[str] | str, timeout: float = 900, env: dict | None = None,
        stdin_text: str = "") -> subprocess.CompletedProcess:
    shell = isinstance(cmd, str)
    return subprocess.run(cmd, shell=shell, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=stdin_text)


def tail(text: str, n: int = 1500) -> str:
    return text.strip()[-n:]


# ------------------------------------------------------------------ install + doctor


def install() -> dict:
    """pipx and the venv install at the same time (two vCPUs; independent directories, both offline
    from the same wheelhouse): each is a single-threaded pip, most of it Python byte-compiling."""
    wheel = next(PAYLOAD.glob("wheel/*.whl"))
    out: dict = {"wheel": wheel.name, "problems": []}
    env = {**os.environ, **OFFLINE, "PIPX_HOME": "/opt/pipx", "PIPX_BIN_DIR": "/usr/local/bin"}
    t0 = time.monotonic()
    venv_cmd = (f"python3 -m venv --system-site-packages {VENV} && "
                f"{VENV}/bin/pip install -q {shlex.quote(str(wheel))}")
    venv_proc = subprocess.Popen(venv_cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, **OFFLINE})
    p = run(["pipx", "install", str(wheel)], env=env)
    out["pipx_seconds"] = round(time.monotonic() - t0, 1)
    v_out, v_err = venv_proc.communicate(timeout=900)
    out["venv_seconds"] = round(time.monotonic() - t0, 1)
    p2 = subprocess.CompletedProcess(venv_cmd, venv_proc.returncode, v_out, v_err)
    out["pipx"] = {"rc": p.returncode, "out": tail(p.stdout + p.stderr, 600)}
    out["venv"] = {"rc": p2.returncode, "out": tail(p2.stdout + p2.stderr, 600)}
    for name, proc in (("pipx", p), ("venv --system-site-packages", p2)):
        if proc.returncode != 0:
            out["problems"].append(f"{name} install failed: {tail(proc.stderr, 300)}")
    # What the wheel pulled in: the venv's own packages (not the system's).
    freeze = run([f"{VENV}/bin/pip", "list", "--local", "--format=json"], env=OFFLINE)
    try:
        out["venv_packages"] = sorted(f"{d['name']}=={d['version']}" for d in json.loads(freeze.stdout))
    except json.JSONDecodeError:
        out["problems"].append("pip list printed no JSON")
    test_only = {"pytest", "httpx", "ruff", "gunicorn", "websockets", "schemathesis", "hypothesis"}
    leaked = [p for p in out.get("venv_packages", []) if p.split("==")[0].lower() in test_only]
    if leaked:
        out["problems"].append(f"test tools installed as runtime dependencies: {leaked}")
    return out


def doctor(binary: Path, label: str, text: bool = False) -> dict:
    t0 = time.monotonic()
    p = run([str(binary), "doctor", "--json"], timeout=1200)
    out = {"label": label, "rc": p.returncode, "seconds": round(time.monotonic() - t0, 1),
           "stderr": tail(p.stderr, 600)}
    try:
        out["checks"] = json.loads(p.stdout)
    except json.JSONDecodeError:
        out["checks"] = []
        out["stdout"] = tail(p.stdout, 600)
    if text:  # the human output too, as a user reads it
        human = run([str(binary), "doctor"], timeout=1200)
        out["text"] = tail(human.stdout, 4000)
    return out


def check_doctor_before(doc: dict, krel: str) -> list[str]:
    """python3-bpfcc and the headers are not installed yet: doctor must fail on exactly those (and
    nothing else required) and name the packages."""
    want = {"BCC": "apt-get install python3-bpfcc", "kernel headers": f"apt-get install linux-headers-{krel}"}
    failed = {c["name"]: c for c in doc["checks"] if c["ok"] is False and c.get("required")}
    problems = [] if doc["rc"] == 1 else [f"doctor exited {doc['rc']} with required checks missing, not 1"]
    if set(failed) != set(want):
        problems.append(f"required failures {sorted(failed)}, expected {sorted(want)}")
    for name, fix in want.items():
        if name in failed and failed[name].get("fix") != fix:
            problems.append(f"{name}: fix {failed[name].get('fix')!r}, expected {fix!r}")
    return problems


def apply_fixes(doc: dict) -> dict:
    """Run each printed fix, verbatim, as a user would paste it (only apt-get installs are expected)."""
    done = []
    for c in doc["checks"]:
        if c["ok"] is False and c.get("required") and c.get("fix"):
            if not c["fix"].startswith("apt-get install "):
                return {"done": done, "problems": [f"unexpected fix for {c['name']}: {c['fix']!r}"]}
            # The user answers apt's "Do you want to continue? [Y/n]".
            p = run(c["fix"], env={"DEBIAN_FRONTEND": "noninteractive"}, stdin_text="Y\n")
            done.append({"fix": c["fix"], "rc": p.returncode, "out": tail(p.stdout + p.stderr, 400)})
    return {"done": done, "problems": [f"{d['fix']!r} exited {d['rc']}" for d in done if d["rc"] != 0]}


def check_doctor_after(doc: dict, how: str) -> list[str]:
    problems = [] if doc["rc"] == 0 else [f"doctor exited {doc['rc']}: {doc['stderr'][-300:]}"]
    by_name = {c["name"]: c for c in doc["checks"]}
    problems += [f"{c['name']} failed: {c['detail']}" for c in doc["checks"]
                 if c["ok"] is False and c.get("required")]
    bcc = by_name.get("BCC", {}).get("detail", "")
    if how not in bcc:
        problems.append(f"BCC check says {bcc!r}, expected it {how} /usr/lib/python3/dist-packages/bcc")
    if not by_name.get("auto would use", {}).get("ok"):
        problems.append("no probe usable")
    return problems


# ------------------------------------------------------------------ a real gunicorn, counted


def start_gunicorn(app_log: Path, user: str | None = None) -> subprocess.Popen:
    app_log.unlink(missing_ok=True)
    cmd = ["/usr/bin/gunicorn", "--workers", "3", "--bind", f"127.0.0.1:{APP_PORT}", "--chdir", str(PAYLOAD),
           "app:app"]
    proc = subprocess.Popen(cmd, env={**os.environ, "IC_APP_LOG": str(app_log)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{APP_PORT}/", 300)
    app_log.unlink(missing_ok=True)  # the readiness request is not part of the count
    return proc


def wait_http(url: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def make_requests(n: int) -> None:
    for _ in range(n):  # one connection each (urllib closes it): accepts == requests
        with urllib.request.urlopen(f"http://127.0.0.1:{APP_PORT}/", timeout=30) as r:
            r.read()


def app_counts(app_log: Path) -> dict[str, int]:
    return dict(Counter(line.strip() for line in app_log.read_text().splitlines() if line.strip()))


def cli_count(binary: Path, n: int) -> dict:
    app_log = Path("/tmp/ic-app.log")
    gun = start_gunicorn(app_log)
    out: dict = {"problems": []}
    try:
        dry = run([str(binary), "--pid", str(gun.pid), "--dry-run"], timeout=900)
        out["dry_run"] = {"rc": dry.returncode, "stderr": tail(dry.stderr, 400)}
        if dry.returncode != 0:
            out["problems"].append(f"--dry-run exited {dry.returncode}")
        export = Path("/tmp/ic-export.json")
        err = Path("/tmp/ic-watch.stderr")
        with open(err, "w") as ef:
            watch = subprocess.Popen([str(binary), "--pid", str(gun.pid), "--quiet", "--no-dashboard",
                                      "--export", str(export)], stdout=subprocess.DEVNULL, stderr=ef)
        deadline = time.monotonic() + 900
        while "attached in" not in err.read_text() and watch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if "attached in" not in err.read_text():
            watch.kill()
            out["problems"].append(f"accept-watch did not attach: {tail(err.read_text(), 400)}")
            return out
        make_requests(n)
        time.sleep(3)  # a few map reads after the last accept
        watch.send_signal(signal.SIGINT)
        watch.wait(120)
        out["rc"] = watch.returncode
        doc = json.loads(export.read_text())
        counted = {str(w["pid"]): w["accepts"] for w in doc["workers"] if w["accepts"]}
        app = app_counts(app_log)
        total = doc.get("total_accepts")
        out.update(n=n, total_accepts=total, watch=counted, app=app, probe=doc.get("probe"))
        if counted != app or sum(app.values()) != n or total != n:
            out["problems"].append(f"accept-watch {counted} (total {total}) != app {app} (n={n})")
        if watch.returncode != 0:
            out["problems"].append(f"accept-watch exited {watch.returncode}: {tail(err.read_text(), 300)}")
    finally:
        gun.terminate()
        gun.wait(60)
    return out


# ------------------------------------------------------------------ main


def timed(kind: str, step: Callable[[], dict]) -> None:
    """Run one phase and emit its result with how long it took (the run's time budget is per phase)."""
    t0 = time.monotonic()
    res = step()
    emit(kind, **res, seconds=round(time.monotonic() - t0, 1))


def main() -> int:
    checks = next((a.split("=", 1)[1].split(",") for a in Path("/proc/cmdline").read_text().split()
                   if a.startswith("ic.checks=")), ["install", "systemd"])
    krel = os.uname().release
    osr = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    emit("boot", kernel=krel, os=osr.get("PRETTY_NAME", "?").strip('"'), python=sys.version.split()[0],
         systemd=run(["systemctl", "--version"]).stdout.split("\n")[0], checks=checks,
         uptime=Path("/proc/uptime").read_text().split()[0])
    try:
        log("installing the wheel (pipx, and a venv with --system-site-packages, side by side)")
        timed("install", install)
        log("doctor before python3-bpfcc and the kernel headers are installed")
        before = doctor(PIPX_BIN, "before", text=True)
        emit("doctor_before", **before, problems=check_doctor_before(before, krel))
        log("running doctor's fix commands")
        timed("fixes", lambda: apply_fixes(before))
        # Both installs' doctors at once: each compiles and attaches every probe kind (the slow part
        # under TCG, one clang at a time per process), two vCPUs.
        log("doctor again, pipx (plain venv) and venv (--system-site-packages) side by side")
        with ThreadPoolExecutor(2) as pool:
            pipx_doc = pool.submit(doctor, PIPX_BIN, "pipx")
            venv_doc = pool.submit(doctor, VENV / "bin/accept-watch", "venv")
            after, after_venv = pipx_doc.result(), venv_doc.result()
        emit("doctor_pipx", **after, problems=check_doctor_after(after, "loaded from"))
        emit("doctor_venv", **after_venv, problems=check_doctor_after(after_venv, "imported from"))
        log(f"--dry-run and an exact count of {N_CLI} connections to Debian's gunicorn")
        timed("count", lambda: cli_count(VENV / "bin/accept-watch", N_CLI))
        if "systemd" in checks:
            from guest_systemd import systemd_check

            timed("systemd", lambda: systemd_check(N_SYSTEMD))
    except Exception:
        emit("error", problems=[traceback.format_exc()[-3000:]])
    print("IC-END", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
