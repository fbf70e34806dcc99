"""Every kernel struct field the BPF program reads, resolved from the running kernel's BTF.

The BPF C never hard-codes a struct layout: it reads fields at OFF_<NAME>, generated from this table
(each field's size is checked against what the C reads, EXPECTED), so a new kernel layout is picked
up without recompiling anything by hand.
Resolution costs ~0.1-0.2 s of BTF parsing, so the result is cached per kernel build (load_layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .btf import PTR, Btf, BtfError

log = logging.getLogger(__name__)

DEFAULT_BTF_PATH = "/sys/kernel/btf/vmlinux"

# NAME -> (struct, dotted member path). OFF_NAME in the generated C.
REQUIRED: dict[str, tuple[str, str]] = {
    "TASK_FILES": ("task_struct", "files"),
    "FILES_FDT": ("files_struct", "fdt"),
    "FDT_FD": ("fdtable", "fd"),
    "FDT_MAX_FDS": ("fdtable", "max_fds"),
    "FILE_PRIVATE_DATA": ("file", "private_data"),
    "SOCKET_SK": ("socket", "sk"),
    # The listener's inode number (what /proc/PID/fd shows as socket:[N]): a socket file's struct
    # socket is the first member of struct socket_alloc, next to its inode, so one read from the
    # socket pointer instead of three (socket -> file -> f_inode -> i_ino).
    "SOCKET_ALLOC_INO": ("socket_alloc", "vfs_inode.i_ino"),
    "SK_SOCKET": ("sock", "sk_socket"),
    "SK_FAMILY": ("sock", "__sk_common.skc_family"),
    "SK_STATE": ("sock", "__sk_common.skc_state"),
    # The local port as inet_sock keeps it (network order): skc_num is zeroed when a closing socket
    # gives its port back, before the CLOSE transition's tracepoint fires.
    "INET_SPORT": ("inet_sock", "inet_sport"),
    "SK_PROTOCOL": ("sock", "sk_protocol"),  # a u16 since 5.6 (a bitfield before: refused loudly)
    "SK_DPORT": ("sock", "__sk_common.skc_dport"),
    "SK_RCV_SADDR": ("sock", "__sk_common.skc_rcv_saddr"),
    "SK_DADDR": ("sock", "__sk_common.skc_daddr"),
    "SK_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "SK_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr"),
    "SK_ACK_BACKLOG": ("sock", "sk_ack_backlog"),
    # When the connection became ESTABLISHED, i.e. entered the accept queue (µs, CLOCK_MONOTONIC):
    # tcp_init_buffer_space() stamps it from tcp_mstamp, and only the owner's reads (tcp_recvmsg ->
    # tcp_rcv_space_adjust) move it again, which cannot happen before accept. Read at accept, it gives
    # the queue wait without following the connection through the state-change tracepoint. (Not the
    # more obvious tcp_mstamp / tcp_clock_cache: data arriving while queued refreshes those.)
    "TCP_RCVQ_SPACE_TIME": ("tcp_sock", "rcvq_space.time"),
    "SK_MAX_ACK_BACKLOG": ("sock", "sk_max_ack_backlog"),
}


@dataclass(frozen=True, slots=True)
class FieldExpectation:
    size: int  # bytes the C code reads
    pointer: bool  # the C code dereferences it as a pointer


_PTR = FieldExpectation(8, True)

# What the BPF C assumes about each field; a kernel that differs must fail loudly, not misread.
EXPECTED: dict[str, FieldExpectation] = {
    "TASK_FILES": _PTR,
    "FILES_FDT": _PTR,
    "FDT_FD": _PTR,
    "FDT_MAX_FDS": FieldExpectation(4, False),
    "FILE_PRIVATE_DATA": _PTR,
    "SOCKET_SK": _PTR,
    "SOCKET_ALLOC_INO": FieldExpectation(8, False),
    "SK_SOCKET": _PTR,
    "SK_FAMILY": FieldExpectation(2, False),
    "SK_STATE": FieldExpectation(1, False),
    "INET_SPORT": FieldExpectation(2, False),
    "SK_PROTOCOL": FieldExpectation(2, False),
    "SK_DPORT": FieldExpectation(2, False),
    "SK_RCV_SADDR": FieldExpectation(4, False),
    "SK_DADDR": FieldExpectation(4, False),
    "SK_V6_DADDR": FieldExpectation(16, False),
    "SK_V6_RCV_SADDR": FieldExpectation(16, False),
    "SK_ACK_BACKLOG": FieldExpectation(4, False),
    "TCP_RCVQ_SPACE_TIME": FieldExpectation(8, False),
    "SK_MAX_ACK_BACKLOG": FieldExpectation(4, False),
}

ACCEPT_FUNC = "inet_csk_accept"

# Where the first system-call argument stays in the user registers saved at syscall entry (struct
# pt_regs), per architecture: at an accept() syscall's exit it is still the listening fd, so the
# exit program finds the listener without an entry program. x86_64 keeps %rdi; arm64 overwrites x0
# with the return value and keeps the argument in orig_x0.
SYSCALL_ARG1_FIELD = {"x86_64": "di", "aarch64": "orig_x0"}
# bpf_get_current_task_btf (5.11) and bpf_task_pt_regs (5.15) reach those registers.
REGS_HELPERS = ("bpf_get_current_task_btf", "bpf_task_pt_regs")


class AcceptProto(enum.StrEnum):
    """Which inet_csk_accept() prototype this kernel has (the fexit program's signature)."""

    SK_FLAGS_ERR_KERN = "sk_flags_err_kern"  # before 6.10: (sk, int flags, int *err, bool kern)
    SK_ARG = "sk_arg"  # 6.10+: (sk, struct proto_accept_arg *arg)
    UNKNOWN = "unknown"  # absent from BTF (or an unrecognised prototype): fexit unavailable


# Accepted spellings per parameter position; "bool" is a typedef of _Bool in the kernel.
_PROTO_SHAPES: dict[AcceptProto, tuple[frozenset[str], ...]] = {
    AcceptProto.SK_FLAGS_ERR_KERN: (
        frozenset({"struct sock *"}),
        frozenset({"int"}),
        frozenset({"int *"}),
        frozenset({"bool", "_Bool"}),
    ),
    AcceptProto.SK_ARG: (frozenset({"struct sock *"}), frozenset({"struct proto_accept_arg *"})),
}
_PROTO_ERA = {AcceptProto.SK_FLAGS_ERR_KERN: "before 6.10", AcceptProto.SK_ARG: "6.10+"}

# Bump when the cached JSON's meaning changes; REQUIRED/EXPECTED are hashed into the key anyway.
_CACHE_FORMAT = 2
_CACHE_FILE = "kernel-layout.json"
_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class KernelLayout:
    defines: dict[str, int]  # OFF_<NAME> for every REQUIRED entry
    accept_proto: AcceptProto
    accept_proto_text: str  # e.g. "inet_csk_accept(struct sock *sk, struct proto_accept_arg *arg) [6.10+]"
    # Offset of the first syscall argument in struct pt_regs, -1 when the listening fd cannot be read
    # at syscall exit (then a sys_enter program stashes it); the text says which way and why.
    syscall_arg1_off: int = -1
    syscall_arg1_text: str = ""
    # How this object was obtained (set by load_layout; not part of the cached data).
    source: str = field(default="btf", compare=False)  # "btf" or "cache"
    load_seconds: float = field(default=0.0, compare=False)
    cache_status: str = field(default="", compare=False)  # hit | miss | stale | corrupt | unwritable

    def define_values(self) -> dict[str, int]:
        """The kernel-dependent #defines of the BPF C: OFF_ of every REQUIRED field,
        ACCEPT_PROTO_SK_ARG (the fexit signature), LISTENER_FROM_REGS and OFF_PT_REGS_ARG1."""
        out = dict(sorted(self.defines.items()))
        out["ACCEPT_PROTO_SK_ARG"] = int(self.accept_proto is AcceptProto.SK_ARG)
        out["LISTENER_FROM_REGS"] = int(self.listener_from_regs)
        out["OFF_PT_REGS_ARG1"] = max(self.syscall_arg1_off, 0)
        return out

    @property
    def listener_from_regs(self) -> bool:
        """The accept syscall's exit reads the listening fd from the saved registers."""
        return self.syscall_arg1_off >= 0

    def to_json(self) -> dict[str, object]:
        return {
            "defines": dict(self.defines),
            "accept_proto": self.accept_proto.value,
            "accept_proto_text": self.accept_proto_text,
            "syscall_arg1_off": self.syscall_arg1_off,
            "syscall_arg1_text": self.syscall_arg1_text,
        }

    @classmethod
    def from_json(cls, doc: object) -> KernelLayout:
        """Strict: anything unexpected raises ValueError (a corrupt cache)."""
        if not isinstance(doc, dict):
            raise ValueError("layout is not an object")
        defines = doc.get("defines")
        if not isinstance(defines, dict):
            raise ValueError("'defines' is not an object")
        want = {f"OFF_{n}" for n in REQUIRED}
        if set(defines) != want:
            raise ValueError(f"'defines' keys differ from the required set ({len(defines)} vs {len(want)})")
        if not all(type(v) is int and v >= 0 for v in defines.values()):
            raise ValueError("'defines' values must be non-negative integers")
        desc = doc.get("accept_proto_text")
        if not isinstance(desc, str):
            raise ValueError("'accept_proto_text' is not a string")
        arg1, arg1_text = doc.get("syscall_arg1_off"), doc.get("syscall_arg1_text")
        if type(arg1) is not int or arg1 < -1 or not isinstance(arg1_text, str):
            raise ValueError("'syscall_arg1_off'/'syscall_arg1_text' missing or malformed")
        return cls(
            defines=dict(defines), accept_proto=AcceptProto(doc.get("accept_proto")), accept_proto_text=desc,
            syscall_arg1_off=arg1, syscall_arg1_text=arg1_text,
        )


def resolve_offsets(btf: Btf) -> KernelLayout:
    """Resolve REQUIRED from BTF and check every size the C code relies on."""
    defines: dict[str, int] = {}
    for name, (struct_name, path) in REQUIRED.items():
        m = btf.member(struct_name, path)
        where = f"{struct_name}.{path} ({name})"
        if m.bitfield:
            raise BtfError(
                f"{where} is a bitfield ({m.bit_size} bits at bit {m.bit_offset}); "
                "the BPF code can only read whole bytes"
            )
        exp = EXPECTED[name]
        if m.size_bytes != exp.size:
            raise BtfError(
                f"{where} is {m.size_bytes} bytes ({m.type_name}); the BPF code expects {exp.size}"
            )
        is_ptr = btf.kind(btf.resolve(m.type_id)) == PTR
        if is_ptr != exp.pointer:
            want = "a pointer" if exp.pointer else "not a pointer"
            raise BtfError(f"{where} has type {m.type_name}; the BPF code expects {want}")
        defines[f"OFF_{name}"] = m.offset_bytes
    if btf.member("socket_alloc", "socket").offset_bytes != 0:
        raise BtfError("socket_alloc.socket is not at offset 0; the BPF code reads a socket's inode from it")
    proto, desc = accept_prototype(btf)
    arg1, arg1_text = syscall_arg1(btf)
    return KernelLayout(defines=defines, accept_proto=proto, accept_proto_text=desc,
                        syscall_arg1_off=arg1, syscall_arg1_text=arg1_text)


def syscall_arg1(btf: Btf, machine: str | None = None) -> tuple[int, str]:
    """(offset of the first syscall argument in struct pt_regs, how the listener is found). -1 means
    the sys_enter program is needed; never an error."""
    machine = machine or os.uname().machine
    field_name = SYSCALL_ARG1_FIELD.get(machine)
    stash = "listening fd stashed by sys_enter_accept*"
    if field_name is None:
        return -1, f"{stash} (saved-register layout not known for {machine})"
    missing = [h for h in REGS_HELPERS if not btf.func_exists(h)]
    if missing:
        return -1, f"{stash} ({', '.join(missing)} not in this kernel: 5.15+)"
    try:
        m = btf.member("pt_regs", field_name)
    except BtfError:
        return -1, f"{stash} (pt_regs.{field_name} not in BTF)"
    if m.size_bytes != 8 or m.bitfield:
        return -1, f"{stash} (pt_regs.{field_name} is {m.size_bytes} bytes)"
    how = f"listening fd read at syscall exit from the saved registers (pt_regs.{field_name})"
    return m.offset_bytes, how


def accept_prototype(btf: Btf) -> tuple[AcceptProto, str]:
    """Classify inet_csk_accept(). Absent (e.g. BTF without static functions) is not an error: it
    only means the fexit probe cannot be used; the description says why."""
    if not btf.func_exists(ACCEPT_FUNC):
        return AcceptProto.UNKNOWN, f"{ACCEPT_FUNC} is not in BTF (fexit unavailable)"
    sig = btf.func_signature(ACCEPT_FUNC)
    types = [t for _, t in sig.params]
    shown = f"{ACCEPT_FUNC}({', '.join(_decl(t, n) for n, t in sig.params)})"
    for proto, shape in _PROTO_SHAPES.items():
        if len(types) == len(shape) and all(t in ok for t, ok in zip(types, shape, strict=True)):
            return proto, f"{shown} [{_PROTO_ERA[proto]}]"
    return AcceptProto.UNKNOWN, f"{shown} [unrecognised prototype: fexit unavailable]"


def _decl(type_name: str, name: str) -> str:
    if not name:
        return type_name
    return f"{type_name}{name}" if type_name.endswith("*") else f"{type_name} {name}"


# ---------------------------------------------------------------------- cache


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "accept-watch"


def cache_key(btf_path: str = DEFAULT_BTF_PATH) -> str:
    """Cheap identity of this kernel build's BTF: sysfs mtimes are meaningless, and hashing the
    whole ~6 MB blob would cost about as much as the cache saves. The header and first 64 KiB (the
    type section's start), the total size, and uname's release + build version pin it down."""
    h = hashlib.sha256()
    try:
        with open(btf_path, "rb") as f:
            head = f.read(_HEAD_BYTES)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise BtfError(f"cannot read BTF from {btf_path}: {e.strerror or e}") from e
    uts = os.uname()
    h.update(head)
    h.update(f"\0{size}\0{uts.release}\0{uts.version}\0{_CACHE_FORMAT}\0".encode())
    h.update(repr(sorted(REQUIRED.items())).encode())
    h.update(repr(sorted(EXPECTED.items())).encode())
    return h.hexdigest()


def load_layout(btf_path: str = DEFAULT_BTF_PATH, cache: Path | None = None) -> KernelLayout:
    """The kernel layout, from the cache when it matches this kernel, else resolved from BTF and
    cached (atomically). `cache` is the cache directory (default $XDG_CACHE_HOME/accept-watch)."""
    t0 = time.perf_counter()
    directory = cache if cache is not None else cache_dir()
    path = directory / _CACHE_FILE
    key = cache_key(btf_path)
    status = "miss"
    try:
        raw = path.read_bytes()  # json.loads decodes; bad UTF-8 then counts as corruption
    except FileNotFoundError:
        raw = None
    except OSError as e:
        log.warning("cannot read layout cache %s: %s; resolving from BTF", path, e.strerror or e)
        raw = None
    if raw is not None:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != _CACHE_FORMAT:
                raise ValueError("unknown cache format")
            if doc.get("key") == key:
                layout = KernelLayout.from_json(doc.get("layout"))
                secs = time.perf_counter() - t0
                log.info("kernel layout from cache %s in %.1f ms", path, secs * 1e3)
                return _with_meta(layout, "cache", secs, "hit")
            status = "stale"
        except (ValueError, TypeError) as e:
            status = "corrupt"
            _CORRUPT_SEEN[0] += 1
            log.warning(
                "ignoring corrupt layout cache %s (%s); rewriting it [corrupt caches seen: %d]",
                path, e, _CORRUPT_SEEN[0],
            )  # fmt: skip
    layout = resolve_offsets(Btf.load(btf_path))
    if not _write_cache(directory, path, key, layout):
        status = "unwritable"
    secs = time.perf_counter() - t0
    log.info("kernel layout resolved from %s in %.3f s (cache %s)", btf_path, secs, status)
    return _with_meta(layout, "btf", secs, status)


_CORRUPT_SEEN = [0]  # process-wide count, reported in the warning


def _with_meta(layout: KernelLayout, source: str, secs: float, status: str) -> KernelLayout:
    return dataclasses.replace(layout, source=source, load_seconds=secs, cache_status=status)


def _write_cache(directory: Path, path: Path, key: str, layout: KernelLayout) -> bool:
    """Write-then-rename so a concurrent reader never sees half a file. A failure is logged, not
    fatal: the layout is already resolved, only the next launch gets slower."""
    doc = {"format": _CACHE_FORMAT, "key": key, "layout": layout.to_json()}
    tmp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kernel-layout.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("cannot write layout cache %s: %s", path, e.strerror or e)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False
