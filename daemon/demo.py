"""`python -m accept_watch.daemon.demo`: a real gunicorn under changing load, watched by accept-watch.

It starts gunicorn (8 sync workers by default) with the bundled demo app on 127.0.0.1 (free port),
drives it with the built-in load generator in alternating phases (light, then heavy, repeat) so the
live view moves, and runs the accept-watch CLI in-process on the gunicorn master until Ctrl-C or
--duration. Whatever happens, gunicorn and the load generator are stopped before it returns.

GunicornProcess (the launcher) is also what the tests' real-server harness builds on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from accept_watch.daemon import waitmode
from accept_watch.daemon.loadgen import LoadGenerator, LoadStats

WORKER_CLASSES: dict[str, str] = {
    "sync": "sync",
    # uvicorn (0.54 here) still ships its gunicorn worker; it warns that the separate uvicorn-worker
    # package is the future home. The class is the same either way.
    "uvicorn": "uvicorn.workers.UvicornWorker",
}

# Exec shim: the child asks the kernel to SIGTERM it if its parent thread dies (even by SIGKILL), then
# becomes gunicorn. A killed test run or demo therefore leaves no gunicorn behind. PDEATHSIG survives
# execve for non-setuid binaries.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:\n"  # 1 = PR_SET_PDEATHSIG
    "    raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')\n"
    "if os.getppid() != int(sys.argv[1]):\n"  # the parent died before prctl took effect
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def current_syscall(pid: int) -> int | None:
    """The syscall number `pid` is blocked in (from /proc/PID/syscall), None if running or unknown."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            state = waitmode.parse_syscall(f.read())
    except (OSError, ValueError):
        return None
    return state.nr if state.nr is not None and state.nr >= 0 else None


def waiting_syscalls() -> dict[int, str]:
    """Syscalls an idle worker sits in when it is ready for connections: the sync worker select()s on
    the listener, the uvicorn worker epoll_wait()s, a plain blocking server is in accept()/accept4()."""
    return {nr: name for nr, name in _table().items() if name in waitmode.WAITING_SYSCALL_NAMES}


def accept_syscalls() -> frozenset[int]:
    return frozenset(nr for nr, name in _table().items() if name in waitmode.ACCEPT_SYSCALL_NAMES)


def _table() -> dict[int, str]:
    try:
        return waitmode.syscall_table()
    except NotImplementedError as exc:
        raise RuntimeError(str(exc)) from None


def spawn_with_pdeathsig(argv: Sequence[str], **popen_kwargs: object) -> subprocess.Popen[bytes]:
    """Popen(argv) whose process gets SIGTERM when this process's current thread dies."""
    shim = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]
    return subprocess.Popen(shim, **popen_kwargs)  # type: ignore[call-overload]


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class GunicornProcess:
    """A real gunicorn master and its workers, in their own session (Ctrl-C in the terminal reaches
    only us; we stop gunicorn ourselves).

    A private work directory holds gunicorn's log and config file (`config_text`, python; an explicit
    -c also keeps gunicorn from picking up a ./gunicorn.conf.py from wherever we were started).
    Use as a context manager, or call start(), wait_ready() and stop().
    """

    def __init__(
        self,
        app: str,
        *,
        workers: int,
        worker_class: str = "sync",
        host: str = "127.0.0.1",
        port: int = 0,
        max_requests: int = 0,
        reuse_port: bool = False,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        pythonpath: str | None = None,
        config_text: str = "",
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if worker_class not in WORKER_CLASSES:
            raise ValueError(f"worker class must be one of {', '.join(WORKER_CLASSES)}, got {worker_class!r}")
        if not 0 <= port < 65536:
            raise ValueError(f"port {port} is out of range 0-65535")
        if max_requests < 0:
            raise ValueError(f"max_requests must be >= 0, got {max_requests}")
        self.app = app
        self.workers = workers
        self.worker_class = worker_class
        self.host = host
        self.requested_port = port
        self.max_requests = max_requests
        self.reuse_port = reuse_port
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.pythonpath = pythonpath
        self.config_text = config_text
        self.workdir = Path(tempfile.mkdtemp(prefix="accept-watch-gunicorn-"))
        self.log_path = self.workdir / "gunicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    # -- life cycle --------------------------------------------------------------------------------

    @property
    def bind_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literals in brackets

    def command(self) -> list[str]:
        config = self.workdir / "gunicorn.conf.py"
        config.write_text(self.config_text or "# accept-watch: no settings beyond the command line\n")
        cmd = [
            sys.executable, "-m", "gunicorn",
            "--config", str(config),
            "--workers", str(self.workers),
            "--worker-class", WORKER_CLASSES[self.worker_class],
            "--bind", f"{self.bind_host}:{self.requested_port}",
            "--no-control-socket",  # gunicorn 27: otherwise every instance shares ~/.gunicorn/gunicorn.ctl
            "--graceful-timeout", "5",
            "--log-level", "warning",
        ]
        if self.max_requests:
            cmd += ["--max-requests", str(self.max_requests), "--max-requests-jitter", "0"]
        if self.reuse_port:
            cmd.append("--reuse-port")
        if self.pythonpath:
            cmd += ["--pythonpath", self.pythonpath]
        return [*cmd, *self.extra_args, self.app]

    def start(self) -> GunicornProcess:
        if self.proc is not None:
            raise RuntimeError("gunicorn already started")
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = spawn_with_pdeathsig(
                self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    @property
    def master_pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("gunicorn not started")
        return self.proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("port not known yet: call wait_ready() first")
        return self._port

    def worker_pids(self) -> list[int]:
        """The master's current children (its workers), sorted."""
        try:
            return sorted(p.pid for p in psutil.Process(self.master_pid).children())
        except psutil.NoSuchProcess:
            return []

    def listening_port(self) -> int | None:
        """The TCP port the master listens on at self.host (from /proc/net/tcp*, without connecting)."""
        try:
            conns = psutil.Process(self.master_pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            return None
        ports = {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.ip == self.host}
        if len(ports) > 1:
            raise RuntimeError(f"gunicorn master listens on several ports at {self.host}: {sorted(ports)}")
        return ports.pop() if ports else None

    def wait_ready(
        self, timeout_s: float = 30.0, extra_check: Callable[[list[int]], bool] | None = None
    ) -> GunicornProcess:
        """Wait until the listener exists and exactly `workers` workers sit idle in a waiting syscall.

        No probe connection is made: it would be an accept of its own, visible to the kernel side.
        `extra_check(worker_pids)` can add a condition (e.g. the workers' post_worker_init markers).
        The condition must hold on two polls in a row, 50 ms apart.
        """
        waiting = waiting_syscalls()
        deadline = time.monotonic() + timeout_s
        streak = 0
        last = "nothing checked yet"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                tail = log_tail(self.log_path)
                raise RuntimeError(f"gunicorn exited during start-up (code {code}):\n{tail}")
            port = self.listening_port()
            pids = self.worker_pids()
            idle = [pid for pid in pids if current_syscall(pid) in waiting]
            if port is None:
                last = "no listening socket yet"
            elif self.requested_port and port != self.requested_port:
                raise RuntimeError(f"gunicorn listens on {port}, not on {self.requested_port}")
            elif len(pids) != self.workers:
                last = f"{len(pids)} of {self.workers} workers"
            elif len(idle) != self.workers:
                last = f"{len(idle)} of {self.workers} workers idle"
            elif extra_check is not None and not extra_check(pids):
                last = "extra readiness check not met"
            else:
                streak += 1
                if streak >= 2:
                    self._port = port
                    return self
                time.sleep(0.05)
                continue
            streak = 0
            time.sleep(0.05)
        raise TimeoutError(f"gunicorn not ready after {timeout_s:.0f} s ({last}):\n{log_tail(self.log_path)}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the master (graceful), SIGKILL after timeout_s; then make sure no process of its
        session survives (workers orphaned by a killed master). Idempotent."""
        if self.proc is None:
            return
        master = self.proc.pid
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        # The master ran in its own session (sid == pgid == its pid); anything left in it is an orphan.
        leftovers = _session_members(master)
        for p in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        deadline = time.monotonic() + 5.0
        while (alive := _living(leftovers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive:
            raise RuntimeError(f"gunicorn processes survived SIGKILL: {sorted(p.pid for p in alive)}")

    def close(self) -> None:
        """stop() and remove the work directory (its log goes with it)."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> GunicornProcess:
        try:
            return self.start().wait_ready()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def _session_members(sid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                members.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return _living(members)


def _living(procs: Sequence[psutil.Process]) -> list[psutil.Process]:
    """Those still running. A zombie counts as dead: it holds no socket, and an init that does not
    reap orphans (as in some containers) would otherwise make it look immortal."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    return alive


# -- the demo ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    clients: int
    rate_per_s: float | None  # None: closed loop
    seconds: float


def default_phases(seconds: float, low: int, high: int) -> list[Phase]:
    return [
        Phase("light", low, 50.0, seconds),  # a trickle: most workers idle, a few take everything
        Phase("heavy", high, None, seconds),  # saturating: the queue builds, accepts spread out
    ]


def describe_phase(phase: Phase) -> str:
    pace = f"at {phase.rate_per_s:g}/s" if phase.rate_per_s else "flat out"
    return f"{phase.clients} clients {pace} for {phase.seconds:g} s ({phase.name})"


class PhasedLoad:
    """Runs the phases in a loop on a background thread until stop()."""

    def __init__(self, host: str, port: int, phases: Sequence[Phase]) -> None:
        if not phases:
            raise ValueError("at least one load phase is needed")
        self.host = host
        self.port = port
        self.phases = list(phases)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-load", daemon=True)
        self._lock = threading.Lock()
        self._ok = 0
        self._failed = 0
        self._last_error: str | None = None
        self._current: LoadGenerator | None = None
        self.phase_name = ""
        self.error: BaseException | None = None

    def start(self) -> PhasedLoad:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for phase in self.phases:
                    gen = LoadGenerator(self.host, self.port, phase.clients, phase.rate_per_s)
                    with self._lock:
                        self._current = gen
                        self.phase_name = phase.name
                    gen.start()
                    self._stop.wait(phase.seconds)
                    stats = gen.stop()
                    with self._lock:
                        self._current = None
                        self._ok += stats.ok
                        self._failed += stats.failed
                        self._last_error = stats.last_error or self._last_error
                    if self._stop.is_set():
                        return
        except BaseException as exc:  # surfaced by stop(); a dead load thread must not go unnoticed
            self.error = exc

    def stop(self) -> LoadStats:
        """Stop after the current phase's in-flight requests (each bounded by the request timeout)."""
        self._stop.set()
        self._thread.join(15.0)
        if self._thread.is_alive():
            raise RuntimeError("demo load thread did not stop")
        if self.error is not None:
            raise RuntimeError(f"demo load generator failed: {self.error}") from self.error
        return self.totals()

    def totals(self) -> LoadStats:
        with self._lock:
            ok, failed, err = self._ok, self._failed, self._last_error
            current = self._current
        live = current.stats if current is not None else LoadStats(0, 0, 0.0, None)
        return LoadStats(ok + live.ok, failed + live.failed, 0.0, live.last_error or err)


Watch = Callable[[list[str]], int]


def _cli_main(argv: list[str]) -> int:
    # Imported here: the CLI pulls in the probes (bcc) and is a separate module.
    from accept_watch.daemon.cli import main as cli_main

    return cli_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m accept_watch.daemon.demo",
        description="Run gunicorn under changing load and watch which worker accepts each connection. "
        "Arguments after -- go to the accept-watch CLI.",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--workers", type=int, default=8, help="gunicorn workers (default 8)")
    p.add_argument("--worker-class", choices=sorted(WORKER_CLASSES), default="sync")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--export", default="out/demo.json", help="JSON export path (default out/demo.json)")
    p.add_argument("--phase-seconds", type=float, default=10.0, help="length of each load phase (default 10)")
    p.add_argument("--low", type=int, default=2, help="clients in the light phase (default 2)")
    p.add_argument("--high", type=int, default=16, help="clients in the heavy phase (default 16)")
    p.add_argument("--app-sleep-ms", type=float, default=2.0, help="work per request in the app (default 2)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.duration is not None and args.duration <= 0:
        raise ValueError(f"--duration must be positive, got {args.duration}")
    for name in ("workers", "low", "high"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.phase_seconds <= 0:
        raise ValueError(f"--phase-seconds must be positive, got {args.phase_seconds}")
    if args.app_sleep_ms < 0:
        raise ValueError(f"--app-sleep-ms must be >= 0, got {args.app_sleep_ms}")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None, watch: Watch | None = None) -> int:
    """Run the demo. `watch` replaces the accept-watch CLI (tests); it gets the CLI's argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli_extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cli_extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
    except ValueError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    watch = watch or _cli_main
    export = Path(args.export).absolute()
    export.parent.mkdir(parents=True, exist_ok=True)

    server: GunicornProcess | None = None
    load: PhasedLoad | None = None
    rc = 1
    stats: LoadStats | None = None
    # Until the CLI installs its own handlers, SIGTERM must unwind through the finally below too.
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        app = "accept_watch.daemon.demo_app:" + ("asgi_app" if args.worker_class == "uvicorn" else "app")
        server = GunicornProcess(
            app, workers=args.workers, worker_class=args.worker_class, port=args.port,
            env={"ACCEPT_WATCH_DEMO_SLEEP_MS": str(args.app_sleep_ms)},
        )
        server.start().wait_ready()
        print(
            f"demo: gunicorn master {server.master_pid} on http://127.0.0.1:{server.port}/ with "
            f"{args.workers} {args.worker_class} workers {server.worker_pids()} (log {server.log_path})",
            flush=True,
        )
        phases = default_phases(args.phase_seconds, args.low, args.high)
        print("demo: load phases, repeating: " + ", then ".join(map(describe_phase, phases)), flush=True)
        load = PhasedLoad("127.0.0.1", server.port, phases).start()
        cli_argv = ["--pid", str(server.master_pid), "--export", str(export)]
        if args.duration is not None:
            cli_argv += ["--duration", format(args.duration, "g")]
        rc = watch(cli_argv + cli_extra)
    except KeyboardInterrupt:
        rc = 130
    except (RuntimeError, TimeoutError, ValueError, OSError, ImportError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        rc = 1
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if load is not None:
                try:
                    stats = load.stop()
                except RuntimeError as exc:
                    print(f"demo: error: {exc}", file=sys.stderr)
                    rc = rc or 1
            if server is not None:
                server.stop()
                if rc not in (0, 130) and server.log_path.exists() and server.log_path.stat().st_size:
                    print(f"demo: gunicorn log tail:\n{log_tail(server.log_path)}", file=sys.stderr)
                server.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    if stats is not None:
        print(f"demo: load generator: {stats.ok} ok, {stats.failed} failed"
              + (f" (last error: {stats.last_error})" if stats.failed else ""))
    if export.exists():
        print(f"demo: JSON export: {export}")
    else:
        print(f"demo: no JSON export was written (expected at {export})", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
