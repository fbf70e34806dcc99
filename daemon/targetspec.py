"""What `accept-watch serve` watches: target specifications from repeated flags and/or a TOML file.

A target is one server, named (the Prometheus `server` label) and found by one of:
  pid N        that process's server (a worker's pid is resolved to its master)
  pidfile F    the pid in F, re-read when the master exits: a restart is a new generation, same target
  unit NAME    a systemd unit: the processes of its cgroup (daemon/units.py)
  port P       whoever listens on TCP port P (in accept-watch's network namespace)
  match REGEX  the topmost process whose command line matches REGEX and whose tree listens
and `all`: every listening socket of the host held by two or more processes, each server a target
found while the daemon runs (daemon/resolve.py).

Everything is bounded (file size, number of targets, name and regex length) and every problem is
one line (SpecError) naming where it is.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sanitize import clean

KINDS = ("pid", "pidfile", "unit", "port", "match")
MAX_CONFIG_BYTES = 64 * 1024
MAX_TARGETS_LIMIT = 1024  # the highest --max-targets accepted
DEFAULT_MAX_TARGETS = 64
MAX_REGEX = 256
MAX_PATH = 4096
MAX_UNIT = 256  # systemd's own limit on unit names
PID_MAX = 4194304
NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]+$")
# `--pidfile web=/run/gunicorn.pid`: a name before '=' (a value of its own with '=' needs the file)
_NAMED = re.compile(r"^([A-Za-z0-9_.:-]{1,64})=(.*)$", re.S)
MIN_RETENTION_S, MAX_RETENTION_S = 1.0, 7 * 86400.0
DEFAULT_RETENTION_S = 300.0
# Settings the file may hold (flags override them), with their types.
SETTINGS: dict[str, tuple[type, ...]] = {
    "listen": (str,), "token": (str,), "export_dir": (str,), "interval": (int, float),
    "retention": (int, float), "resolve_every": (int, float), "max_targets": (int,), "all": (bool,),
    "probe": (str,), "no_inflight": (bool,),
}


class SpecError(Exception):
    """Bad target or configuration input: one line."""


@dataclass(frozen=True, slots=True)
class TargetSpec:
    kind: str  # one of KINDS
    value: str | int
    name: str | None = None  # None: derived (derived_name)
    origin: str = "command line"  # where it came from, for messages

    def describe(self) -> str:
        return f"{self.kind} {clean(str(self.value))[:120]}"


@dataclass(slots=True)
class ServeConfig:
    specs: list[TargetSpec] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def check_name(name: str, where: str) -> str:
    if not NAME_RE.match(name):
        raise SpecError(f"{where}: a target name is 1-64 characters of A-Z a-z 0-9 _ . : - "
                        f"(got {clean(name[:80])!r})")
    return name


def parse_value(kind: str, raw: Any, where: str) -> str | int:
    """One target value, checked and bounded."""
    if kind in ("pid", "port"):
        if isinstance(raw, str) and raw.isdigit() and len(raw) <= 7:
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise SpecError(f"{where}: {kind} must be a whole number, got {clean(str(raw)[:40])!r}")
        high = PID_MAX if kind == "pid" else 65535
        if not 0 < raw <= high:
            raise SpecError(f"{where}: {kind} must be from 1 to {high}, got {raw}")
        return raw
    if not isinstance(raw, str) or not raw:
        raise SpecError(f"{where}: {kind} must be a non-empty string")
    if kind == "pidfile":
        if len(raw) > MAX_PATH or "\0" in raw or not raw.startswith("/"):
            raise SpecError(f"{where}: pidfile must be an absolute path (got {clean(raw[:80])!r})")
        return raw
    if kind == "unit":
        if len(raw) > MAX_UNIT or not UNIT_RE.match(raw) or raw.startswith(".") or "/" in raw:
            raise SpecError(f"{where}: not a systemd unit name: {clean(raw[:80])!r}")
        return raw if "." in raw else raw + ".service"
    if kind == "match":
        if len(raw) > MAX_REGEX:
            raise SpecError(f"{where}: a match regex is at most {MAX_REGEX} characters")
        try:
            re.compile(raw)
        except re.error as exc:
            raise SpecError(f"{where}: bad regex {clean(raw[:80])!r}: {exc}") from None
        return raw
    raise SpecError(f"{where}: unknown target kind {clean(kind[:40])!r}")


def from_flag(kind: str, text: str) -> TargetSpec:
    """`--KIND [NAME=]VALUE`."""
    where = f"--{kind}"
    name = None
    m = _NAMED.match(text)
    if m:
        # 'a=b' is always NAME=VALUE: a regex with '=' after a name-like start goes in the config file
        # (or starts with a character a name cannot have, e.g. '^').
        name, text = m.group(1), m.group(2)
    if len(text) > MAX_PATH:
        raise SpecError(f"{where}: value too long")
    return TargetSpec(kind, parse_value(kind, text, where), name, "command line")


def load_config(path: str) -> ServeConfig:
    """The TOML file: top-level settings and [[target]] tables. Read bounded; a regular file only."""
    try:
        # O_NONBLOCK: a FIFO named as the config must not hang the daemon's start (refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecError(f"cannot read {clean(path[:200])}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SpecError(f"{clean(path[:200])}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise SpecError(f"cannot read {clean(path[:200])}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise SpecError(f"{clean(path[:200])}: larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SpecError(f"{clean(path[:200])}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{clean(path[:200])}: {clean(str(exc))}") from None
    return parse_config(data, clean(path[:200]))


def parse_config(data: dict[str, Any], where: str) -> ServeConfig:
    cfg = ServeConfig()
    for key, value in data.items():
        if key == "target":
            continue
        if key not in SETTINGS:
            raise SpecError(f"{where}: unknown setting {clean(key[:40])!r} (known: target, "
                            f"{', '.join(sorted(SETTINGS))})")
        types = SETTINGS[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise SpecError(f"{where}: {key} must be {' or '.join(t.__name__ for t in types)}")
        cfg.settings[key] = value
    targets = data.get("target", [])
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise SpecError(f"{where}: targets are [[target]] tables")
    if len(targets) > MAX_TARGETS_LIMIT:
        raise SpecError(f"{where}: more than {MAX_TARGETS_LIMIT} targets")
    for i, table in enumerate(targets, 1):
        here = f"{where}: target {i}"
        unknown = set(table) - {"name", *KINDS}
        if unknown:
            raise SpecError(f"{here}: unknown key {clean(sorted(unknown)[0][:40])!r} "
                            f"(known: name, {', '.join(KINDS)})")
        kinds = [k for k in KINDS if k in table]
        if len(kinds) != 1:
            raise SpecError(f"{here}: give exactly one of {', '.join(KINDS)}")
        name = table.get("name")
        if name is not None and not isinstance(name, str):
            raise SpecError(f"{here}: name must be a string")
        if name is not None:
            check_name(name, here)
        cfg.specs.append(TargetSpec(kinds[0], parse_value(kinds[0], table[kinds[0]], here), name, where))
    return cfg


def derived_name(spec: TargetSpec) -> str | None:
    """The `server` label of an unnamed target, from its specification alone (so it does not depend on
    whether the server was running when the daemon started); None for a pid (named after what it is,
    command:port, when first found, as in session mode)."""
    if spec.name:
        return spec.name
    if spec.kind == "pidfile":
        stem = Path(str(spec.value)).name.removesuffix(".pid")
        return _safe(stem) or "pidfile"
    if spec.kind == "unit":
        return _safe(str(spec.value).removesuffix(".service")) or "unit"
    if spec.kind == "port":
        return f"port:{spec.value}"
    if spec.kind == "match":
        return _safe("match:" + str(spec.value)) or "match"
    return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]+", "_", text).strip("_")[:64]


def check_unique(specs: list[TargetSpec]) -> None:
    seen: dict[str, TargetSpec] = {}
    values: dict[tuple[str, str | int], TargetSpec] = {}
    for s in specs:
        key = (s.kind, s.value)
        if key in values:
            raise SpecError(f"{s.origin}: {s.describe()} is given twice")
        values[key] = s
        name = derived_name(s)
        if name is None:
            continue
        if name in seen:
            raise SpecError(f"{s.origin}: two targets are named {name!r} ({seen[name].describe()} and "
                            f"{s.describe()}): give them names")
        seen[name] = s
