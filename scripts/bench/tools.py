"""The benchmark's moving parts besides the servers: wrk, accept-watch, the bpftrace one-liner, and
a dashboard client polling /api/snapshot."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procstat import ProcGone, cpu_seconds, memory_kib
from .servers import REPO, VENV_BIN

HERE = Path(__file__).resolve().parent
ACCEPT_WATCH = VENV_BIN / "accept-watch"


class ToolError(Exception):
    """A tool failed to start, attach or stop (one line)."""


# ---------------------------------------------------------------------------------------- wrk


@dataclass
class Load:
    """How wrk drives the server: as fast as it answers (rate None) or paced to about `rate`/s."""

    name: str
    rate: float | None = None
    connections: int = 64
    delay_ms: float | None = None  # per-connection delay before each request (paced loads)


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    latency_us: dict[str, float]
    errors: dict[str, int]

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


def wrk_command(url: str, load: Load, duration_s: float) -> list[str]:
    binary = shutil.which("wrk")
    if binary is None:
        raise ToolError("wrk not found (Debian's wrk; scripts/setup.sh installs it)")
    cmd = [
        binary,
        "-t1",
        f"-c{load.connections}",
        f"-d{duration_s:g}s",
        "--latency",
        "-H",
        "Connection: close",
    ]
    if load.delay_ms is None:
        return [*cmd, "-s", str(HERE / "max.lua"), url]
    return [*cmd, "-s", str(HERE / "paced.lua"), url, "--", f"{load.delay_ms:.4f}"]


def parse_wrk(output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON ") :])
            duration = data["duration_us"] / 1e6
            return WrkResult(
                requests=data["requests"],
                duration_s=duration,
                rps=data["requests"] / duration,
                latency_us={k: float(v) for k, v in data["latency_us"].items()},
                errors=data["errors"],
            )
    raise ToolError(f"wrk printed no BENCH_JSON line: {output.strip()[-300:]!r}")


def run_wrk(url: str, load: Load, duration_s: float) -> WrkResult:
    proc = subprocess.run(
        wrk_command(url, load, duration_s), capture_output=True, text=True, timeout=duration_s + 60
    )
    if proc.returncode != 0:
        raise ToolError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return parse_wrk(proc.stdout)


class WrkProcess:
    """wrk in the background, stopped on demand (SIGINT: wrk stops and prints its summary)."""

    def __init__(self, url: str, load: Load, max_duration_s: float) -> None:
        self.proc = subprocess.Popen(
            wrk_command(url, load, max_duration_s), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def stop(self) -> WrkResult:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0:
            raise ToolError(f"wrk failed ({self.proc.returncode}): {err.strip()[-300:]}")
        return parse_wrk(out)


# ------------------------------------------------------------------------------- attached tools


class Attached:
    """A process that observes the server: started, waited for until it is ready, stopped by SIGINT."""

    name = "tool"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.launched_at = 0.0
        self.ready_s: float | None = None
        self.stderr_lines: list[str] = []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ToolError(f"{self.name} is not running")
        return self.proc.pid

    def _is_ready_line(self, line: str) -> bool:
        raise NotImplementedError

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))
            if not self._ready.is_set() and self._is_ready_line(line):
                self.ready_s = time.monotonic() - self.launched_at
                self._ready.set()

    def _launch(self, cmd: list[str], stdout_path: Path, env: dict[str, str] | None = None) -> None:
        out = open(stdout_path, "w")  # noqa: SIM115 - the child owns it until it exits
        self.launched_at = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=env, cwd=self.workdir
        )
        out.close()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True, name=f"{self.name}-stderr")
        self._reader.start()

    def wait_ready(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                raise ToolError(
                    f"{self.name} exited ({self.proc.returncode}) before it was ready: {self._stderr_tail()}"
                )
            if time.monotonic() > deadline:
                raise ToolError(f"{self.name} not ready {timeout:.0f} s after launch: {self._stderr_tail()}")
        assert self.ready_s is not None
        return self.ready_s

    def _stderr_tail(self) -> str:
        return " | ".join(self.stderr_lines[-4:]) or "(nothing on stderr)"

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def memory_kib(self) -> dict[str, int]:
        return memory_kib(self.pid)

    def interrupt(self, timeout: float = 60.0) -> tuple[int, float]:
        """SIGINT, wait for exit. Returns (exit status, seconds to exit)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise ToolError(f"{self.name} did not exit {timeout:.0f} s after SIGINT (killed)") from None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return rc, time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


ATTACHED_RE = re.compile(r"compiled in ([0-9.]+) s, attached in ([0-9.]+) s")


class AcceptWatch(Attached):
    name = "accept-watch"

    def __init__(
        self,
        workdir: Path,
        master_pid: int,
        events: bool,
        dashboard_port: int | None,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        """prefix: the command that runs another version (before.py); extra: more options."""
        super().__init__(workdir)
        self.export_path = workdir / "aw-export.json"
        self.events_path = workdir / "aw-events.ndjson" if events else None
        self.prefix = prefix
        cmd = [*(prefix or [str(ACCEPT_WATCH)]), "--pid", str(master_pid), "--export", str(self.export_path),
               *extra]
        if self.events_path is not None:
            cmd += ["--events", str(self.events_path)]
        if dashboard_port is None:
            cmd += ["--no-dashboard", "--quiet"]
        else:
            cmd += ["--listen", f"127.0.0.1:{dashboard_port}"]
        self.command = cmd
        self._env = env
        for path in (self.export_path, self.events_path):
            if path is not None:
                path.unlink(missing_ok=True)

    def start(self) -> None:
        if self.prefix is None and not ACCEPT_WATCH.exists():
            raise ToolError(f"{ACCEPT_WATCH} not found (scripts/setup.sh installs it)")
        self._launch(self.command, self.workdir / "aw-stdout.txt", env=self._env)

    def _is_ready_line(self, line: str) -> bool:
        return line.startswith("accept-watch: probe ") and "attached in" in line

    def attach_report(self) -> dict[str, Any]:
        """What accept-watch said about its probe: kind, compile and attach seconds."""
        for line in self.stderr_lines:
            if self._is_ready_line(line):
                m = ATTACHED_RE.search(line)
                kind = line.split()[2]
                return {
                    "probe": kind,
                    "compile_s": float(m.group(1)) if m else None,
                    "attach_s": float(m.group(2)) if m else None,
                }
        raise ToolError("accept-watch printed no 'attached' line")

    def export(self) -> dict[str, Any]:
        if not self.export_path.exists():
            raise ToolError(f"accept-watch wrote no export ({self._stderr_tail()})")
        return json.loads(self.export_path.read_text())

    def event_lines(self) -> int | None:
        if self.events_path is None:
            return None
        with open(self.events_path, "rb") as f:
            return sum(1 for _ in f)


BPFTRACE_PROGRAM = (
    'tracepoint:syscalls:sys_exit_accept4 /args->ret >= 0/ { printf("%d %s %d\\n", pid, comm, args->ret); }'
)
# bpftrace runs BEGIN once every probe is attached: our "ready" marker.
BPFTRACE_READY = 'BEGIN { printf("attached\\n"); }'


class Bpftrace(Attached):
    """The usual ad-hoc alternative: one line per accept, to a file."""

    name = "bpftrace"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.out_path = workdir / "bpftrace.txt"
        self.out_path.unlink(missing_ok=True)
        binary = shutil.which("bpftrace")
        if binary is None:
            raise ToolError("bpftrace not found (Debian's bpftrace; scripts/setup.sh installs it)")
        # stdout redirected to the file (as `bpftrace -e ... > FILE`): bpftrace then writes each line at
        # once, whereas with -o FILE it buffers until exit (and the BEGIN marker cannot be seen).
        self.command = [binary, "-e", f"{BPFTRACE_READY} {BPFTRACE_PROGRAM}"]

    def start(self) -> None:
        self._launch(self.command, self.out_path)
        # printf output goes to the file: watch it for the BEGIN line.
        threading.Thread(target=self._watch_file, daemon=True, name="bpftrace-ready").start()

    def _watch_file(self) -> None:
        assert self.proc is not None
        while self.proc.poll() is None and not self._ready.is_set():
            with contextlib.suppress(FileNotFoundError), open(self.out_path) as f:
                for line in f:
                    if line.strip() == "attached":
                        self.ready_s = time.monotonic() - self.launched_at
                        self._ready.set()
                        return
            time.sleep(0.02)

    def _is_ready_line(self, line: str) -> bool:
        return False  # readiness comes from the output file

    def counts(self, pids: set[int]) -> tuple[dict[int, int], int, int]:
        """(accepts per pid for `pids`, all accept lines, events bpftrace reported lost)."""
        by_pid: Counter[int] = Counter()
        lost = 0
        total = 0
        with open(self.out_path, errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[0].isdigit() and parts[-1].isdigit():
                    total += 1
                    pid = int(parts[0])
                    if pid in pids:
                        by_pid[pid] += 1
                elif line.startswith("Lost ") and "events" in line:
                    lost += int(line.split()[1])
        return dict(sorted(by_pid.items())), total, lost


# --------------------------------------------------------------------------- dashboard client


@dataclass
class PollStats:
    ok: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    last_error: str | None = None


class SnapshotPoller(threading.Thread):
    """A dashboard client: GET /api/snapshot once a second, as a browser tab or a scraper would."""

    def __init__(self, port: int, every_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="snapshot-poller")
        self.port = port
        self.every_s = every_s
        self.stats = PollStats()
        self._stop_event = threading.Event()

    def wait_up(self, timeout: float = 15.0) -> float:
        """Until the dashboard answers /healthz (it starts after the probes are attached)."""
        started = time.monotonic()
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    return time.monotonic() - started
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() - started > timeout:
                raise ToolError(f"the dashboard on port {self.port} did not answer within {timeout:.0f} s")
            time.sleep(0.05)

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            started = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/api/snapshot")
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if resp.status != 200 or not body.startswith(b"{"):
                    raise ValueError(f"HTTP {resp.status}")
                self.stats.ok += 1
                self.stats.latencies_ms.append((time.monotonic() - started) * 1000)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                self.stats.failed += 1
                self.stats.last_error = str(exc) or type(exc).__name__
            next_at += self.every_s
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> PollStats:
        self._stop_event.set()
        self.join(timeout=10)
        return self.stats


def repo_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' (uncommitted changes)' if dirty else ''}"


def version_of(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


__all__ = [
    "AcceptWatch",
    "Bpftrace",
    "Load",
    "PollStats",
    "ProcGone",
    "SnapshotPoller",
    "ToolError",
    "WrkProcess",
    "WrkResult",
    "repo_commit",
    "run_wrk",
    "version_of",
]
