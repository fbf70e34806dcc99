"""Run the real `accept-watch` CLI as a subprocess against a real server, for kernel tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

ACCEPT_WATCH = [sys.executable, "-m", "accept_watch.daemon.cli"]


class Started(Protocol):
    """An accept-watch process a test started (WatchRun here, ServeRun in tests/servewatch.py)."""

    proc: subprocess.Popen[str]

    def stderr(self) -> str: ...

    def stop(self, sig: int = ..., timeout: float = ...) -> int: ...


def stop_process(proc: subprocess.Popen[str], sig: int, timeout: float) -> int:
    """Signal an accept-watch the test started and reap it; one that does not exit in time is killed
    and the timeout raised (a test must not pass on a hung daemon)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@dataclass
class WatchRun:
    proc: subprocess.Popen[str]
    export: Path
    events: Path | None
    stderr_path: Path

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        return stop_process(self.proc, sig, timeout)

    def document(self) -> dict:
        return json.loads(self.export.read_text())

    def event_lines(self) -> list[dict]:
        assert self.events is not None
        return [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def start_watch(pid: int | None, tmp: Path, *extra: str, events: bool = False, timeout: float = 60,
                dashboard: str | None = None) -> WatchRun:
    """Start accept-watch on `pid` and return once its probes are attached (and its dashboard
    serves, when `dashboard` gives HOST:PORT). pid None: no --pid (the target comes from `extra`,
    e.g. --pidfile)."""
    export = tmp / "export.json"
    ev_path = tmp / "events.ndjson" if events else None
    stderr_path = tmp / "accept-watch.stderr"
    web = ["--listen", dashboard] if dashboard else ["--no-dashboard"]
    target = [] if pid is None else ["--pid", str(pid)]
    cmd = [*ACCEPT_WATCH, *target, "--export", str(export), *web, "--quiet", *extra]
    if ev_path is not None:
        cmd += ["--events", str(ev_path)]
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run = WatchRun(proc, export, ev_path, stderr_path)
    wait_ready(run, lambda err: "attached in" in err and (dashboard is None or "dashboard at" in err),
               "accept-watch", timeout)
    return run


def wait_ready(run: Started, ready: Callable[[str], bool], name: str, timeout: float) -> None:
    """Wait until `ready(its stderr)` for an accept-watch the test started (a WatchRun, or servewatch's
    ServeRun); one that exits or is not ready in time (then killed) fails with its stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready(run.stderr()):
            return
        if run.proc.poll() is not None:
            raise AssertionError(f"{name} exited {run.proc.returncode}: {run.stderr()}")
        time.sleep(0.05)
    run.stop(signal.SIGKILL)
    raise AssertionError(f"{name} was not ready within {timeout} s: {run.stderr()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, timeout: float = 60, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*ACCEPT_WATCH, *args]
    if user is not None:
        # Drop root for the privilege check: setpriv (util-linux) clears every capability.
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",  # numeric ids
               "--inh-caps=-all", "--bounding-set=-all", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def bpf_program_ids_of(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds open (prog_id in its fds' fdinfo): unlike the names,
    not confused by another accept-watch running on the same machine."""
    ids: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                text = f.read(4096)
        except OSError:
            continue  # closed meanwhile
        ids.update(int(line.split()[1]) for line in text.splitlines()
                   if line.startswith("prog_id:") and line.split()[1:2] and line.split()[1].isdigit())
    return ids


def loaded_bpf_program_ids() -> set[int]:
    """Ids of every BPF program loaded on the machine (ids are allocated cyclically: not soon reused)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return {p["id"] for p in json.loads(out.stdout)}


def our_bpf_program_ids() -> set[int]:
    """Ids of loaded BPF programs whose names are ours (BCC names programs after their function)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    prefixes = ("tracepoint__sys", "tracepoint__soc", "tracepoint__sch", "kretprobe__inet", "kretfunc__inet")
    return {p["id"] for p in json.loads(out.stdout) if str(p.get("name", "")).startswith(prefixes)}
