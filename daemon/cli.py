"""accept-watch command line: watch a pre-fork server, `doctor`, `report`.

Data flow: probes (kernel counters, optional per-connection events) -> daemon.watch (aggregation)
-> terminal view, JSON export, dashboard.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from accept_watch import __version__

from .sanitize import clean

EXAMPLES = """\
examples:
  sudo accept-watch --pid 4242                     live view + dashboard on http://127.0.0.1:9177/
  sudo accept-watch --pid 4242 --duration 60 --export run.json
  sudo accept-watch --pid 4242 --events conns.ndjson    one JSON line per connection
  sudo accept-watch --pid 4242 --probe tracepoint  force the accept syscall tracepoints
  sudo accept-watch --pid 4242 --listen 0.0.0.0:9177  dashboard on all interfaces (token required)
  sudo accept-watch --pidfile /run/gunicorn.pid     follow the server through restarts
  sudo accept-watch --pid 4242 --dry-run           compile, attach, detach, exit 0
  accept-watch --pid 4242 --print-bpf              print the generated BPF program
  sudo accept-watch doctor                         what this kernel allows, which probe would be used
  accept-watch report run.json --html run.html     summary of an export (no root needed)
  sudo accept-watch serve --config /etc/accept-watch/serve.toml   host daemon, many servers (serve --help)
"""


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


# Input bounds (every input is bounded): a run of up to a year, map reads 0.1-60 s apart (below 0.1 s
# the loop busy-waits a core for nothing; the kernel counters are exact at any read interval).
MAX_DURATION_S = 366 * 86400.0
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.1, 60.0
MAX_PORTS = 64
MAX_TOKEN = 256
MAX_HOST = 253  # the longest DNS name
PID_MAX = 4194304  # the kernel's highest possible pid_max
MAX_ARG = 4096


def bounded_float(low: float, high: float, low_inclusive: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text[:MAX_ARG])
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {clean(text[:40])!r}") from None
        too_low = value < low if low_inclusive else value <= low
        if not math.isfinite(value) or too_low or value > high:
            edge = ">=" if low_inclusive else ">"
            raise argparse.ArgumentTypeError(
                f"must be a number {edge} {low:.10g} and <= {high:.10g}, got {clean(text[:40])}")
        return value

    return parse


duration_seconds = bounded_float(0.0, MAX_DURATION_S)
interval_seconds = bounded_float(MIN_INTERVAL_S, MAX_INTERVAL_S, low_inclusive=True)
grace_seconds = bounded_float(0.0, 86400.0, low_inclusive=True)


def path_text(text: str) -> str:
    if not text or len(text) > MAX_ARG or "\0" in text:
        raise argparse.ArgumentTypeError(f"not a usable path: {clean(text[:80])!r}")
    return text


def token_text(text: str) -> str:
    if len(text) > MAX_TOKEN:
        raise argparse.ArgumentTypeError(f"at most {MAX_TOKEN} characters")
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise argparse.ArgumentTypeError("must be non-empty printable text without spaces")
    return text


def port_number(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


def sample_rate(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1_000_000:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 1000000, got {text!r}")
    return int(text)


def listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {clean(text[:80])!r}")
    if len(host) > MAX_HOST + 2 or not host.isprintable():
        raise argparse.ArgumentTypeError(f"not a host name or address: {clean(host[:80])!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def pid_number(text: str) -> int:
    if not text.isdigit() or len(text) > 7 or not 0 < int(text) <= PID_MAX:
        raise argparse.ArgumentTypeError(f"not a process id: {clean(text[:40])!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"accept-watch: error: {clean(message)}\n")


def watch_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="accept-watch",
        description=(
            "Which worker of a pre-fork server accepts each connection, measured in the kernel with "
            "eBPF. Subcommands: 'doctor' (what this kernel allows), 'report FILE.json' (summarize an "
            "export)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pid", type=pid_number,
                   help="the server's master process id (a worker's pid is resolved to its master)")
    p.add_argument("--pidfile", type=path_text, metavar="FILE",
                   help="the server's pid file (gunicorn --pid, nginx pid): read for --pid when that is not "
                        "given, and again when the master exits, so a full restart is followed")
    p.add_argument("--grace", type=grace_seconds, default=30.0, metavar="S",
                   help="after the master exits with nobody holding its sockets, wait S seconds for a "
                        "successor before stopping (30)")
    p.add_argument("--duration", type=duration_seconds,
                   help="stop after S seconds, at most a year (default: until Ctrl-C)")
    p.add_argument("--export", type=Path, metavar="FILE.json",
                   help="write the JSON document here (atomically, every few seconds and at exit)")
    p.add_argument("--events", type=Path, metavar="FILE.ndjson",
                   help="one JSON line per connection (switches on the per-connection stream)")
    p.add_argument("--events-sample", type=sample_rate, default=1, metavar="N",
                   help="with --events: one line per N connections, marked sampled_1_in (default 1: all)")
    p.add_argument("--port", type=port_number, action="append", metavar="N",
                   help="only the server's listening port N (repeatable; default: all of them)")
    p.add_argument("--probe", choices=["auto", "fexit", "kretprobe", "tracepoint"], default="auto",
                   help="hook to use; auto tries fexit, kretprobe, then the accept syscall tracepoints")
    p.add_argument("--listen", type=listen_address, default=("127.0.0.1", 9177), metavar="HOST:PORT",
                   help="dashboard address (default 127.0.0.1:9177; a non-loopback address needs a token)")
    p.add_argument("--token", type=token_text,
                   help="dashboard token (default: generated when --listen is not loopback)")
    p.add_argument("--no-dashboard", action="store_true", help="do not serve the web dashboard")
    p.add_argument("--stream", action="store_true",
                   help="per-connection events for the dashboard's /api/events (costs CPU at high rates)")
    p.add_argument("--no-inflight", action="store_true",
                   help="do not follow connections to their close (no in-flight counts or accept->close "
                        "times; saves the TCP state-change tracepoint, the largest per-connection cost)")
    p.add_argument("--interval", type=interval_seconds, default=1.0,
                   help=f"seconds between map reads, {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} (1)")
    p.add_argument("--print-bpf", action="store_true", help="print the generated BPF program and exit")
    p.add_argument("--dry-run", action="store_true", help="compile and attach the probes, detach, exit 0")
    p.add_argument("--quiet", action="store_true", help="no live terminal table")
    p.add_argument("--version", action="version", version=f"accept-watch {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "doctor":
            from .doctor import run_doctor

            return run_doctor(argv[1:])
        if argv and argv[0] == "serve":
            from .serve import run_serve

            return run_serve(argv[1:])
        if argv and argv[0] == "report":
            from .report import run_report

            return run_report(argv[1:])
        parser = watch_parser()
        args = parser.parse_args(argv)
        if args.pid is None and args.pidfile is None:
            parser.error("one of --pid or --pidfile is required")
        if args.port and len(set(args.port)) > MAX_PORTS:
            print(f"accept-watch: error: at most {MAX_PORTS} --port options", file=sys.stderr)
            return 2
        from .watch import run_watch

        return run_watch(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed (e.g. piped into head): nothing left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
