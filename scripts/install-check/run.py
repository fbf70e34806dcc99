#!/usr/bin/env python3
"""`make install-check` / `make systemd-check`: the wheel, and only the wheel, on Debian 12 and 13.

For each suite (bookworm = Debian 12, trixie = Debian 13) a plain Debian system booting its own stock
kernel with systemd is built once by build_root.sh and cached under ~/.cache/accept-watch/install-check/
(keyed by the recipe's hash). Each run builds the wheel from the current sources, downloads its
dependencies from PyPI for that suite's Python (the guest has no network), puts wheel + wheelhouse +
the systemd unit + the check scripts on a second disk, boots the guests side by side under QEMU (TCG:
this host's KVM stops at the kernel's first BMI2 instruction with "KVM internal error. Suberror: 1,
emulation failure") and reads guest_check.py's IC-RESULT lines from the serial console.

Exit status: 0 everything passed; 1 a check failed (or a guest died); 2 bad usage or host set-up;
3 packages could not be fetched (Debian archive or PyPI unreachable: not a test failure).
Standard library only (the host's python3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("IC_CACHE", Path.home() / ".cache/accept-watch/install-check"))
SUITES = {"bookworm": ("Debian 12", "3.11"), "trixie": ("Debian 13", "3.13")}
GENERATION = "1"  # bump to rebuild the roots when something outside build_root.sh changes their meaning
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_FETCH = 0, 1, 2, 3
NICE = ["nice", "-n", "10"]
# Every PyPI platform tag a Debian 12/13 x86_64 pip accepts for compiled wheels (glibc 2.36 / 2.41).
PLATFORMS = ["manylinux2014_x86_64", *(f"manylinux_2_{m}_x86_64" for m in range(17, 37)), "linux_x86_64"]


class FetchFailed(Exception):
    pass


class SetupError(Exception):
    pass


def say(msg: str) -> None:
    print(f"install-check: {msg}", flush=True)


def root_key(suite: str) -> str:
    h = hashlib.sha256()
    for part in (GENERATION, suite, os.environ.get("KM_MIRROR", "")):
        h.update(part.encode() + b"\0")
    for script in (HERE / "build_root.sh", REPO / "scripts/lib/chroot-build.sh"):
        h.update(script.read_bytes())
    return h.hexdigest()[:16]


def ensure_root(suite: str) -> Path:
    out = CACHE / f"root-{suite}-{root_key(suite)}"
    if (out / "root.img").exists():
        say(f"[{suite}] using cached root {out}")
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    say(f"[{suite}] building the guest root (a few minutes)")
    proc = subprocess.run(["bash", str(HERE / "build_root.sh"), suite, str(out)])
    if proc.returncode == 3:
        raise FetchFailed(f"building the {suite} root")
    if proc.returncode != 0:
        raise SetupError(f"build_root.sh {suite} failed (exit {proc.returncode})")
    for old in CACHE.glob(f"root-{suite}-*"):
        if old != out and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return out


# ------------------------------------------------------------------ the wheel and its dependencies


def build_wheel(dest: Path, python: str) -> Path:
    """The wheel from the tracked sources (a clean copy: no egg-info or build/ left in the worktree)."""
    listing = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode()
    with tempfile.TemporaryDirectory(prefix="ic-src-") as tmp:
        for rel in filter(None, listing.split("\0")):
            if (REPO / rel).is_file() and not rel.startswith(".venv/"):
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, Path(tmp) / rel)
        proc = subprocess.run([*NICE, python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), tmp],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchFailed(f"pip wheel failed: {proc.stderr.strip()[-400:]}")
    return next(dest.glob("accept_watch-*.whl"))


def wheel_problems(wheel: Path) -> tuple[list[str], list[str]]:
    """(runtime requirements, problems): only the daemon's dependencies unconditionally, no tests."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        reqs = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    runtime = [r for r in reqs if "extra ==" not in r]
    problems = []
    allowed = {"psutil", "fastapi", "uvicorn", "prometheus-client"}
    bare = {r.split(">")[0].split("=")[0].split("<")[0].split(";")[0].strip().lower() for r in runtime}
    if bare != allowed:
        problems.append(f"runtime requirements {sorted(bare)}, expected {sorted(allowed)}")
    if stray := [n for n in names if not n.startswith(("accept_watch/", "accept_watch-"))]:
        problems.append(f"files outside the package: {stray[:5]}")
    if "accept_watch/probes/accept_watch.c" not in names:
        problems.append("the BPF C source is not in the wheel")
    return runtime, problems


def wheelhouse(wheel: Path, dest: Path, python: str, versions: list[str]) -> None:
    for v in versions:
        cmd = [*NICE, python, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", v,
               "--implementation", "cp", "-d", str(dest), str(wheel),
               # pipx upgrades its shared pip/setuptools/wheel from the index before installing.
               "pip", "setuptools", "wheel"]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_FIND_LINKS": ""})
        if proc.returncode != 0:
            raise FetchFailed(f"pip download for Python {v} failed: {proc.stderr.strip()[-400:]}")
    (dest / wheel.name).unlink(missing_ok=True)  # the wheel itself goes on the disk separately


def payload_disk(dest: Path, wheel: Path, house: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="ic-payload-") as tmp:
        stage = Path(tmp) / "p"
        (stage / "wheel").mkdir(parents=True)
        shutil.copy2(wheel, stage / "wheel")
        shutil.copytree(house, stage / "wheelhouse")
        for name in ("guest_check.py", "guest_systemd.py", "app.py"):
            shutil.copy2(HERE / name, stage / name)
        for name in ("accept-watch.service", "accept-watch-sysctl.conf"):
            shutil.copy2(REPO / "deploy/systemd" / name, stage / name)
        for p in [stage, *stage.rglob("*")]:  # www-data (the gunicorn service) reads app.py
            p.chmod(0o755 if p.is_dir() else 0o644)
        size_mb = 2 * sum(f.stat().st_size for f in stage.rglob("*") if f.is_file()) // 2**20 + 64
        dest.unlink(missing_ok=True)
        with open(dest, "wb") as f:
            f.truncate(size_mb * 2**20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "ic-payload", "-d", str(stage), str(dest)], check=True,
                       capture_output=True)


# ------------------------------------------------------------------ one guest


def boot(root: Path, payload: Path, suite: str, checks: list[str], timeout_s: float) -> dict:
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    console = logs / f"{suite}.console.log"
    append = ("root=/dev/vda rw console=ttyS0 panic=-1 quiet loglevel=3 systemd.show_status=0 "
              f"ic.checks={','.join(checks)}")
    cmd = [*NICE, "qemu-system-x86_64", "-nodefaults", "-accel", "tcg,thread=multi", "-cpu", "max",
           "-smp", "2", "-m", "3072", "-display", "none", "-monitor", "none", "-serial", "stdio",
           "-no-reboot", "-net", "none",
           "-kernel", str(root / "vmlinuz"), "-initrd", str(root / "initrd.img"), "-append", append,
           # cache=unsafe: the guest's fsyncs (dpkg does one per file) go to a throw-away overlay anyway.
           "-drive", f"file={root / 'root.img'},format=raw,if=virtio,snapshot=on,cache=unsafe",
           "-drive", f"file={payload},format=raw,if=virtio,readonly=on"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed = threading.Event()

    def watchdog() -> None:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            killed.set()
            proc.kill()

    threading.Thread(target=watchdog, daemon=True).start()
    run: dict = {"suite": suite, "results": {}, "ended": False, "console": str(console)}
    cpu = [0.0]
    run["loadavg"] = []  # the host's 1-minute load average every ~30 s: how shared the cores were

    def cpu_sampler() -> None:  # QEMU's CPU time: the guest's work, whatever else loads the host
        tick = os.sysconf("SC_CLK_TCK")
        while proc.poll() is None:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu[0] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
            if len(run["loadavg"]) < 1000 and int(time.monotonic() - t0) % 30 < 2:
                run["loadavg"].append(round(os.getloadavg()[0], 1))
            time.sleep(2)

    threading.Thread(target=cpu_sampler, daemon=True).start()
    assert proc.stdout is not None
    with open(console, "w") as out:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "").rstrip("\n")
            out.write(line + "\n")
            out.flush()
            if (i := line.find("IC-RESULT ")) >= 0:
                try:
                    res = json.loads(line[i + 10:])
                    run["results"][res["kind"]] = res
                    bad = res.get("problems") or []
                    say(f"[{suite}] {time.monotonic() - t0:5.0f}s {res['kind']}: "
                        f"{'FAIL ' + '; '.join(map(str, bad))[:600] if bad else 'ok'}")
                except (json.JSONDecodeError, KeyError):
                    say(f"[{suite}] unparseable result: {line[:200]}")
            elif (i := line.find("IC-LOG ")) >= 0:
                say(f"[{suite}] {time.monotonic() - t0:5.0f}s {line[i + 7:]}")
            elif "IC-END" in line:
                run["ended"] = True
            elif "IC-FATAL" in line or "Kernel panic" in line:
                say(f"[{suite}] {line.strip()}")
    proc.wait()
    run["seconds"] = round(time.monotonic() - t0)
    run["qemu_cpu_seconds"] = round(cpu[0])
    if killed.is_set():
        run["error"] = f"guest timed out after {timeout_s:.0f} s (console: {console})"
    elif not run["ended"]:
        run["error"] = f"guest stopped before the end, qemu exit {proc.returncode} (console: {console})"
    return run


def problems_of(run: dict, checks: list[str]) -> list[str]:
    want = ["boot", "install", "doctor_before", "fixes", "doctor_pipx", "doctor_venv", "count"]
    want += ["systemd"] if "systemd" in checks else []
    out = [run["error"]] if run.get("error") else []
    for kind in want:
        res = run["results"].get(kind)
        if res is None:
            out.append(f"{kind}: no result")
        else:
            out += [f"{kind}: {p}" for p in res.get("problems") or []]
    if err := run["results"].get("error"):
        out += [f"guest exception: {p}" for p in err.get("problems", [])]
    return out


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the wheel on Debian 12 and 13, under QEMU")
    ap.add_argument("--suites", default="bookworm,trixie", help="comma-separated: bookworm,trixie")
    ap.add_argument("--checks", default="install,systemd", help="install (always) and optionally systemd")
    ap.add_argument("--timeout", type=float, default=3000, help="seconds per guest (3000)")
    ap.add_argument("--python", default=str(REPO / ".venv/bin/python"),
                    help="a Python with pip, used to build the wheel and download dependencies")
    ap.add_argument("--json", type=Path, help="write every guest result here")
    ap.add_argument("--doc", type=Path, default=REPO / "docs/install-check.md",
                    help="where to write the Markdown summary (default docs/install-check.md)")
    ap.add_argument("--no-doc", action="store_true", help="do not write the Markdown file")
    args = ap.parse_args(argv)
    suites = [s for s in args.suites.split(",") if s]
    checks = [c for c in args.checks.split(",") if c]
    bad = [s for s in suites if s not in SUITES] + [c for c in checks if c not in ("install", "systemd")]
    if not suites or bad:
        ap.error("bad --suites or --checks")
    t0 = time.monotonic()
    host: dict[str, float] = {}
    try:
        if os.geteuid() != 0:
            raise SetupError("run as root (debootstrap, chroot, mkfs)")
        for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4"):
            if not shutil.which(tool):
                raise SetupError(f"{tool} not found (make kernel-matrix installs the host tools)")
        t_roots = time.monotonic()
        with ThreadPoolExecutor(len(suites)) as pool:  # two debootstraps: mostly network and dpkg waits
            roots = dict(zip(suites, pool.map(ensure_root, suites), strict=True))
        host["roots"] = time.monotonic() - t_roots
        t_payload = time.monotonic()
        work = CACHE / "run"
        shutil.rmtree(work, ignore_errors=True)
        (work / "wheel").mkdir(parents=True)
        wheel = build_wheel(work / "wheel", args.python)
        runtime, wheel_bad = wheel_problems(wheel)
        say(f"wheel {wheel.name}: runtime requirements {', '.join(runtime)}")
        wheelhouse(wheel, work / "wheelhouse", args.python, [SUITES[s][1] for s in suites])
        say(f"wheelhouse from PyPI: {len(list((work / 'wheelhouse').iterdir()))} wheels")
        payload_disk(work / "payload.img", wheel, work / "wheelhouse")
        host["wheel, PyPI wheelhouse, payload disk"] = time.monotonic() - t_payload
    except FetchFailed as exc:
        say(f"FETCH FAILED: {exc} (not a test failure)")
        return EXIT_FETCH
    except SetupError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    runs, failed = [], False
    for w in wheel_bad:
        say(f"FAIL wheel: {w}")
        failed = True
    # The guests side by side: each spends most of its time in one single-threaded step (pip, dpkg,
    # clang) on one of its two vCPUs, so two guests fill this host's two cores.
    t_guests = time.monotonic()
    for suite in suites:
        say(f"[{suite}] booting {SUITES[suite][0]} under QEMU TCG: {', '.join(checks)}")
    with ThreadPoolExecutor(len(suites)) as pool:
        futures = {s: pool.submit(boot, roots[s], work / "payload.img", s, checks, args.timeout)
                   for s in suites}
        done = {s: f.result() for s, f in futures.items()}
    host["guests (side by side)"] = time.monotonic() - t_guests
    for suite in suites:
        run = done[suite]
        manifest = (roots[suite] / "manifest.txt").read_text().splitlines()
        run["manifest"] = dict(line.split(" ", 1) for line in manifest if " " in line)
        run["problems"] = problems_of(run, checks)
        runs.append(run)
        verdict = "PASS" if not run["problems"] else "FAIL"
        say(f"[{suite}] {verdict} in {run['seconds'] / 60:.1f} min")
        for p in run["problems"]:
            print(f"    - {p[:1500]}")
        failed = failed or bool(run["problems"])
    host["total"] = time.monotonic() - t0
    doc = {"wheel": wheel.name, "runtime": runtime, "runs": runs, "host_seconds": host,
           "loadavg_at_end": [round(x, 1) for x in os.getloadavg()], "cpus": os.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    if not args.no_doc:
        from render import render  # scripts/install-check/render.py

        args.doc.write_text(render(doc))
        say(f"wrote {args.doc}")
    say(f"{'FAILED' if failed else 'passed'} in {(time.monotonic() - t0) / 60:.1f} min")
    return EXIT_FAIL if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
