"""accept-watch command line: watch a pre-fork server, `doctor`, `report`.

Data flow: probes (kernel counters, optional per-connection events) -> daemon.watch (aggregation)
-> terminal view, JSON export, dashboard.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from accept_watch import __version__

EXAMPLES = """\
examples:
  sudo accept-watch --pid 4242                     live view + dashboard on http://127.0.0.1:9177/
  sudo accept-watch --pid 4242 --duration 60 --export run.json
  sudo accept-watch --pid 4242 --events conns.ndjson    one JSON line per connection
  sudo accept-watch --pid 4242 --probe tracepoint  force the accept syscall tracepoints
  sudo accept-watch --pid 4242 --listen 0.0.0.0:9177  dashboard on all interfaces (token required)
  sudo accept-watch --pid 4242 --dry-run           compile, attach, detach, exit 0
  accept-watch --pid 4242 --print-bpf              print the generated BPF program
  sudo accept-watch doctor                         what this kernel allows, which probe would be used
  accept-watch report run.json --html run.html     summary of an export (no root needed)
"""


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


def sample_rate(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1_000_000:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 1000000, got {text!r}")
    return int(text)


def listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def pid_number(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"accept-watch: error: {message}\n")


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
    p.add_argument("--pid", type=pid_number, required=True, help="the server's master process id")
    p.add_argument("--duration", type=positive_float, help="stop after S seconds (default: until Ctrl-C)")
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
    p.add_argument("--token", help="dashboard token (default: generated when --listen is not loopback)")
    p.add_argument("--no-dashboard", action="store_true", help="do not serve the web dashboard")
    p.add_argument("--stream", action="store_true",
                   help="per-connection events for the dashboard's /api/events (costs CPU at high rates)")
    p.add_argument("--no-inflight", action="store_true",
                   help="do not follow connections to their close (no in-flight counts or accept->close "
                        "times; saves the TCP state-change tracepoint, the largest per-connection cost)")
    p.add_argument("--interval", type=positive_float, default=1.0, help="seconds between map reads (1)")
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
        if argv and argv[0] == "report":
            from .report import run_report

            return run_report(argv[1:])
        args = watch_parser().parse_args(argv)
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
