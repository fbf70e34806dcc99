"""`python -m demo` (`make demo`): a real gunicorn under changing load, watched by accept-watch.

It starts gunicorn (8 sync workers by default) with the bundled demo app (demo/app.py) on 127.0.0.1
(free port), drives it with the built-in load generator (demo/loadgen.py) in alternating phases
(light, then heavy, repeat) so the live view moves, and runs the accept-watch CLI in-process on the
gunicorn master until Ctrl-C or --duration. Whatever happens, gunicorn and the load generator are
stopped before it returns. The demo is not part of the installed package: run it from the repository.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from demo.gunicorn import WORKER_CLASSES, GunicornProcess, log_tail
from demo.loadgen import LoadGenerator, LoadStats

REPO_ROOT = Path(__file__).resolve().parent.parent



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
        prog="python -m demo",
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
        app = "demo.app:" + ("asgi_app" if args.worker_class == "uvicorn" else "app")
        server = GunicornProcess(
            app, workers=args.workers, worker_class=args.worker_class, port=args.port,
            env={"ACCEPT_WATCH_DEMO_SLEEP_MS": str(args.app_sleep_ms)}, pythonpath=str(REPO_ROOT),
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
        print("demo: (the load is stopped after accept-watch's final read, so it counts the requests "
              "made in between, which the export does not)")
    if export.exists():
        print(f"demo: JSON export: {export}")
    else:
        print(f"demo: no JSON export was written (expected at {export})", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
