"""`accept-watch serve` options: flags, the TOML file (--config), and how they combine.

Targets are the union of the file's [[target]] tables and the target flags; every other setting is
the flag when given, else the file's value, else the default. Each bad value is one line (SpecError).
"""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import cli
from .sanitize import clean
from .targetspec import (
    DEFAULT_MAX_TARGETS,
    DEFAULT_RETENTION_S,
    KINDS,
    MAX_RETENTION_S,
    MAX_TARGETS_LIMIT,
    MIN_RETENTION_S,
    SpecError,
    TargetSpec,
    check_unique,
    from_flag,
    load_config,
)

EXAMPLES = """\
targets (repeatable; NAME= sets the Prometheus `server` label):
  --pid [NAME=]N  --pidfile [NAME=]FILE  --unit [NAME=]UNIT  --port [NAME=]P  --match [NAME=]REGEX  --all

examples:
  sudo accept-watch serve --config /etc/accept-watch/serve.toml
  sudo accept-watch serve --pidfile web=/run/gunicorn.pid --unit nginx --export-dir /var/lib/accept-watch
  sudo accept-watch serve --all --listen 0.0.0.0:9177 --token "$TOKEN"
"""
MIN_RESOLVE_S, MAX_RESOLVE_S = 0.5, 3600.0
DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:9177", "token": None, "export_dir": None, "interval": 1.0,
    "retention": DEFAULT_RETENTION_S, "resolve_every": 5.0, "max_targets": DEFAULT_MAX_TARGETS, "all": False,
    "probe": "auto", "no_inflight": False,
}
PROBES = ("auto", "fexit", "kretprobe", "tracepoint")


@dataclass(slots=True)
class ServeOptions:
    specs: list[TargetSpec] = field(default_factory=list)
    all: bool = False
    listen: tuple[str, int] = ("127.0.0.1", 9177)
    token: str | None = None
    export_dir: Path | None = None
    interval: float = 1.0
    retention: float = DEFAULT_RETENTION_S
    resolve_every: float = 5.0
    max_targets: int = DEFAULT_MAX_TARGETS
    probe: str = "auto"
    no_inflight: bool = False
    dry_run: bool = False


def serve_parser() -> argparse.ArgumentParser:
    p = cli._Parser(prog="accept-watch serve", epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Watch many servers at once, for weeks: /metrics (a `server` label per "
                                "target), /api/targets, optional per-target exports.")
    p.add_argument("--config", metavar="FILE", type=cli.path_text,
                   help="TOML file: settings and [[target]] tables")
    for kind in KINDS:
        p.add_argument(f"--{kind}", action="append", default=[], metavar="[NAME=]VALUE", type=_bounded,
                       help=f"a target found by {kind} (repeatable)")
    p.add_argument("--all", action="store_true", default=None,
                   help="also every listening socket held by two or more processes (found as they appear)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="HTTP address (127.0.0.1:9177; non-loopback needs a token)")
    p.add_argument("--token", help="HTTP token (generated and logged when --listen is not loopback)")
    p.add_argument("--export-dir", metavar="DIR", type=cli.path_text,
                   help="write DIR/<server>.json for every target, atomically, every 10 s and at exit")
    p.add_argument("--interval", metavar="S", help="seconds between counter reads (1)")
    p.add_argument("--retention", metavar="S",
                   help="exited workers are folded into pid=\"exited\" S seconds after exit "
                        f"({DEFAULT_RETENTION_S:g})")
    p.add_argument("--resolve-every", metavar="S",
                   help="look for down targets and new --all servers every S s (5)")
    p.add_argument("--max-targets", metavar="N", help=f"at most N targets ({DEFAULT_MAX_TARGETS})")
    p.add_argument("--probe", choices=PROBES, default=None, help="hook to use (auto)")
    p.add_argument("--no-inflight", action="store_true", default=None,
                   help="no in-flight / accept->close figures")
    p.add_argument("--dry-run", action="store_true", help="resolve targets, compile, attach, detach, exit 0")
    return p


def _bounded(text: str) -> str:
    if len(text) > 4096 or "\0" in text:
        raise argparse.ArgumentTypeError("value too long or not text")
    return text


def _number(key: str, value: Any, low: float, high: float, integer: bool = False) -> float:
    try:
        v = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        raise SpecError(f"{key}: not a number: {clean(str(value)[:40])!r}") from None
    if not low <= v <= high or (integer and v != int(v)):
        raise SpecError(f"{key}: must be a {'whole ' if integer else ''}number from {low:g} to {high:g}, "
                        f"got {clean(str(value)[:40])}")
    return v


def options_from_argv(argv: list[str]) -> ServeOptions:
    args = serve_parser().parse_args(argv)
    settings: dict[str, Any] = {}
    specs: list[TargetSpec] = []
    if args.config:
        cfg = load_config(args.config)
        settings.update(cfg.settings)
        specs.extend(cfg.specs)
    for kind in KINDS:
        specs.extend(from_flag(kind, text) for text in getattr(args, kind))
    for key in DEFAULTS:
        flag = getattr(args, key, None)
        if flag is not None:
            settings[key] = flag
    merged = {**DEFAULTS, **settings}
    opts = ServeOptions(specs=specs, all=bool(merged["all"]), dry_run=args.dry_run)
    try:
        opts.listen = cli.listen_address(str(merged["listen"]))
        opts.token = None if merged["token"] is None else cli.token_text(str(merged["token"]))
    except argparse.ArgumentTypeError as exc:
        raise SpecError(f"listen/token: {exc}") from None
    opts.interval = _number("interval", merged["interval"], cli.MIN_INTERVAL_S, cli.MAX_INTERVAL_S)
    opts.retention = _number("retention", merged["retention"], MIN_RETENTION_S, MAX_RETENTION_S)
    opts.resolve_every = _number("resolve_every", merged["resolve_every"], MIN_RESOLVE_S, MAX_RESOLVE_S)
    opts.max_targets = int(_number("max_targets", merged["max_targets"], 1, MAX_TARGETS_LIMIT, integer=True))
    if merged["probe"] not in PROBES:
        raise SpecError(f"probe: one of {', '.join(PROBES)}, got {clean(str(merged['probe'])[:40])!r}")
    opts.probe = str(merged["probe"])
    opts.no_inflight = bool(merged["no_inflight"])
    if merged["export_dir"] is not None:
        opts.export_dir = _export_dir(str(merged["export_dir"]))
    if not specs and not opts.all:
        raise SpecError("nothing to watch: give targets (--pid, --pidfile, --unit, --port, --match, "
                        "[[target]] in --config) or --all")
    if len(specs) > opts.max_targets:
        raise SpecError(f"{len(specs)} targets given, more than max_targets ({opts.max_targets})")
    check_unique(specs)
    return opts


def _export_dir(text: str) -> Path:
    if not text or len(text) > 4096 or "\0" in text:
        raise SpecError("export_dir: not a usable path")
    path = Path(text)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise SpecError(f"export_dir {clean(text[:200])}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SpecError(f"export_dir {clean(text[:200])}: not a directory (a symlink is not followed)")
    return path
