"""The BTF format as accept-watch reads it (Documentation/bpf/btf.rst, include/uapi/linux/btf.h): the
header, the kinds and how many words each record takes, and the plain results of a lookup (Member,
FuncSignature). probes/btf.py reads blobs with them."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_HEADER_MIN_LEN = 24
_HEADER_WITH_LAYOUT_LEN = 32  # newer blobs may append layout_off, layout_len

# BTF_KIND_* values.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT = 9, 10, 11, 12, 13, 14, 15, 16
DECL_TAG, TYPE_TAG, ENUM64 = 17, 18, 19

KIND_NAMES = {
    0: "VOID", INT: "INT", PTR: "PTR", ARRAY: "ARRAY", STRUCT: "STRUCT", UNION: "UNION", ENUM: "ENUM",
    FWD: "FWD", TYPEDEF: "TYPEDEF", VOLATILE: "VOLATILE", CONST: "CONST", RESTRICT: "RESTRICT",
    FUNC: "FUNC", FUNC_PROTO: "FUNC_PROTO", VAR: "VAR", DATASEC: "DATASEC", FLOAT: "FLOAT",
    DECL_TAG: "DECL_TAG", TYPE_TAG: "TYPE_TAG", ENUM64: "ENUM64",
}  # fmt: skip

# Extra u32 words after the 3-word btf_type header: (fixed words, words per vlen element).
_EXTRA_WORDS: dict[int, tuple[int, int]] = {
    INT: (1, 0),  # u32 encoding/offset/bits
    PTR: (0, 0),
    ARRAY: (3, 0),  # btf_array {type, index_type, nelems}
    STRUCT: (0, 3),  # btf_member {name_off, type, offset}
    UNION: (0, 3),
    ENUM: (0, 2),  # btf_enum {name_off, val}
    FWD: (0, 0),
    TYPEDEF: (0, 0),
    VOLATILE: (0, 0),
    CONST: (0, 0),
    RESTRICT: (0, 0),
    FUNC: (0, 0),  # vlen holds the linkage, not a count
    FUNC_PROTO: (0, 2),  # btf_param {name_off, type}
    VAR: (1, 0),  # btf_var {linkage}
    DATASEC: (0, 3),  # btf_var_secinfo {type, offset, size}
    FLOAT: (0, 0),
    DECL_TAG: (1, 0),  # btf_decl_tag {component_idx}
    TYPE_TAG: (0, 0),
    ENUM64: (0, 3),  # btf_enum64 {name_off, val_lo32, val_hi32}
}
_VLEN_IS_COUNT = {k for k, (_, per) in _EXTRA_WORDS.items() if per}

# Kinds that only qualify another type: skipped when asking "what is this, really?".
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
_QUALIFIER_WORDS = {CONST: "const", VOLATILE: "volatile", RESTRICT: "restrict"}
_MAX_CHAIN = 64  # a deeper reference chain means a cycle (corrupt BTF)


class BtfError(Exception):
    """Malformed BTF, or a name/member that the BTF does not have. The message is one line."""


@dataclass(frozen=True, slots=True)
class Member:
    """Where a (possibly nested) struct member lives, relative to the start of the outer struct."""

    offset_bytes: int  # for a bitfield: the byte holding its first bit
    size_bytes: int  # typedefs/qualifiers resolved; for a bitfield: its storage type's size
    type_name: str  # spelled as in C, e.g. "struct files_struct *", "__u16", "struct in6_addr"
    bitfield: bool
    bit_offset: int = 0  # exact bit offset from the outer struct's start
    bit_size: int = 0  # bitfield width in bits (0 when not a bitfield)
    type_id: int = field(default=0, compare=False)  # BTF id of the member's (unresolved) type


@dataclass(frozen=True, slots=True)
class FuncSignature:
    name: str
    return_type: str
    params: tuple[tuple[str, str], ...]  # (name, type); a variadic tail is ("", "...")

    def c_decl(self) -> str:
        """e.g. "struct sock *inet_csk_accept(struct sock *sk, struct proto_accept_arg *arg)"."""
        args = ", ".join(_join_decl(t, n) for n, t in self.params) or "void"
        return f"{_join_decl(self.return_type, self.name)}({args})"


def _split_member_offset(off: int, kind_flag: bool) -> tuple[int, int]:
    """A btf_member offset word -> (bit offset, bitfield size). With kind_flag set on the struct,
    bits 24-31 hold the bitfield size and bits 0-23 the bit offset; otherwise all 32 bits are the
    offset and a bitfield is only visible through its INT type's encoding."""
    return (off & 0xFFFFFF, off >> 24) if kind_flag else (off, 0)


def _join_decl(type_name: str, name: str) -> str:
    if not name:
        return type_name
    return f"{type_name}{name}" if type_name.endswith("*") else f"{type_name} {name}"
