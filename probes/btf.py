"""A small, pure-Python reader for raw BTF blobs (/sys/kernel/btf/vmlinux).

Only what accept-watch needs: struct member offsets (through anonymous structs/unions) and
function prototypes. Format: Documentation/bpf/btf.rst and include/uapi/linux/btf.h.

Speed matters (vmlinux has ~150k types and we run at every launch), so loading is one pass over
the type section viewed as an array of u32 words (every BTF record is a multiple of 4 bytes),
recording where each type starts. Names are decoded on demand; only STRUCT, UNION and FUNC names
are indexed up front, because those are the only ones looked up by name.

Split BTF (kernel modules, which need vmlinux as a base) is not supported: we only read vmlinux.
The format's constants and the lookup results are in probes/btfformat.py.
"""

from __future__ import annotations

import struct
import sys
from array import array

from .btfformat import (  # noqa: F401 - the kinds and results are also read through this module
    _EXTRA_WORDS,
    _HEADER,
    _HEADER_MIN_LEN,
    _HEADER_WITH_LAYOUT_LEN,
    _MAX_CHAIN,
    _MODIFIERS,
    _QUALIFIER_WORDS,
    _VLEN_IS_COUNT,
    ARRAY,
    BTF_MAGIC,
    CONST,
    DATASEC,
    DECL_TAG,
    ENUM,
    ENUM64,
    FLOAT,
    FUNC,
    FUNC_PROTO,
    FWD,
    INT,
    KIND_NAMES,
    PTR,
    RESTRICT,
    STRUCT,
    TYPE_TAG,
    TYPEDEF,
    UNION,
    VAR,
    VOLATILE,
    BtfError,
    FuncSignature,
    Member,
    _join_decl,
    _split_member_offset,
)


class Btf:
    """An indexed, read-only view of one raw BTF blob."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._parse_header()
        self._index_types()
        self._name_cache: dict[int, str] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str = "/sys/kernel/btf/vmlinux") -> Btf:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BtfError(f"cannot read BTF from {path}: {e.strerror or e}") from e
        try:
            return cls(data)
        except BtfError as e:
            raise BtfError(f"{path}: {e}") from e

    @classmethod
    def from_bytes(cls, data: bytes) -> Btf:
        return cls(data)

    def _parse_header(self) -> None:
        data = self._data
        if len(data) < _HEADER_MIN_LEN:
            raise BtfError(f"not BTF: {len(data)} bytes is shorter than the {_HEADER_MIN_LEN}-byte header")
        if data[:2] == b"\x9f\xeb":
            order = "<"
        elif data[:2] == b"\xeb\x9f":
            order = ">"
        else:
            raise BtfError(f"not BTF: bad magic {data[:2].hex()} (expected 0xeB9F)")
        self._swapped = (order == "<") != (sys.byteorder == "little")
        _, version, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            order + _HEADER.format[1:], data, 0
        )
        if version != 1:
            raise BtfError(f"unsupported BTF version {version}")
        if hdr_len < _HEADER_MIN_LEN or hdr_len > len(data):
            raise BtfError(f"bad BTF header length {hdr_len}")
        # Optional layout section (newer encoders): per-kind record sizes, which lets us skip kinds
        # this reader does not know instead of failing on them.
        self._layout: dict[int, tuple[int, int]] = {}
        if hdr_len >= _HEADER_WITH_LAYOUT_LEN:
            layout_off, layout_len = struct.unpack_from(order + "II", data, _HEADER_MIN_LEN)
            lstart = hdr_len + layout_off
            if layout_len % 4 or lstart + layout_len > len(data):
                raise BtfError(f"BTF layout section out of bounds (off {layout_off}, len {layout_len})")
            for kind in range(layout_len // 4):
                info_sz, elem_sz, _flags = struct.unpack_from(order + "BBH", data, lstart + 4 * kind)
                self._layout[kind] = (info_sz, elem_sz)
        tstart, sstart = hdr_len + type_off, hdr_len + str_off
        if type_len % 4 or tstart % 4 or tstart + type_len > len(data):
            raise BtfError(f"BTF type section out of bounds or misaligned (off {type_off}, len {type_len})")
        if sstart + str_len > len(data):
            raise BtfError(f"BTF string section out of bounds (off {str_off}, len {str_len})")
        if str_len and data[sstart] != 0:
            raise BtfError("BTF string section does not start with an empty string")
        self._tstart, self._tlen = tstart, type_len
        self._sstart, self._slen = sstart, str_len

    def _index_types(self) -> None:
        words = array("I")
        if words.itemsize != 4:  # pragma: no cover - every CPython platform we run on has a 4-byte "I"
            raise BtfError("this Python has no 4-byte unsigned array type")
        words.frombytes(self._data[self._tstart : self._tstart + self._tlen])
        if self._swapped:
            words.byteswap()
        self._words = words
        extra = dict(_EXTRA_WORDS)
        for kind, (info_sz, elem_sz) in self._layout.items():
            if kind not in extra and kind:
                if info_sz % 4 or elem_sz % 4:
                    raise BtfError(f"BTF layout for kind {kind} is not in whole u32 words")
                extra[kind] = (info_sz // 4, elem_sz // 4)
        # Flatten to lists indexed by kind: list indexing is the cheapest lookup in the hot loop.
        nkinds = 128
        fixed = [-1] * nkinds
        per = [0] * nkinds
        for kind, (f, p) in extra.items():
            fixed[kind], per[kind] = f, p

        offs = array("I", [0])  # type id 0 is void: no record
        named: dict[int, list[int]] = {}  # name_off -> ids, for STRUCT/UNION/FUNC only
        want = (STRUCT, UNION, FUNC)
        append = offs.append
        n = len(words)
        i = 0
        tid = 0
        while i < n:
            if i + 3 > n:
                raise BtfError(f"BTF type section truncated inside type id {tid + 1}")
            tid += 1
            append(i)
            info = words[i + 1]
            # Masks are the widened ones (kind: 7 bits, vlen: 24 bits) of layout-aware encoders; in
            # classic BTF those extra bits must be zero, so both encodings decode the same.
            kind = (info >> 24) & 0x7F
            f = fixed[kind]
            if f < 0:
                raise BtfError(f"unknown BTF kind {kind} at type id {tid}; cannot skip it")
            if kind in want:
                name_off = words[i]
                if name_off:
                    ids = named.get(name_off)
                    if ids is None:
                        named[name_off] = [tid]
                    else:
                        ids.append(tid)
            i += 3 + f + per[kind] * (info & 0xFFFFFF)
        if i != n:
            raise BtfError(f"BTF type section truncated inside type id {tid}")
        self._offs = offs
        self._by_name: dict[str, list[int]] = {}
        for name_off, ids in named.items():
            self._by_name.setdefault(self._str(name_off), []).extend(ids)

    # ------------------------------------------------------------------ raw access

    def __len__(self) -> int:
        """Number of types, not counting void (id 0)."""
        return len(self._offs) - 1

    def _base(self, tid: int) -> int:
        if tid <= 0 or tid >= len(self._offs):
            raise BtfError(f"BTF type id {tid} out of range (1..{len(self._offs) - 1})")
        return self._offs[tid]

    def _str(self, off: int) -> str:
        if off >= self._slen:
            raise BtfError(f"BTF string offset {off} beyond the {self._slen}-byte string section")
        start = self._sstart + off
        end = self._data.find(b"\0", start, self._sstart + self._slen)
        if end < 0:
            raise BtfError(f"BTF string at offset {off} is not NUL-terminated")
        return self._data[start:end].decode("utf-8", "replace")

    def kind(self, tid: int) -> int:
        if tid == 0:
            return 0
        return (self._words[self._base(tid) + 1] >> 24) & 0x7F

    def kind_name(self, tid: int) -> str:
        k = self.kind(tid)
        return KIND_NAMES.get(k, f"KIND{k}")

    def name(self, tid: int) -> str:
        """The type's own name ("" if anonymous or void)."""
        if tid == 0:
            return ""
        name_off = self._words[self._base(tid)]
        return self._name(name_off)

    def _name(self, name_off: int) -> str:
        if not name_off:
            return ""
        s = self._name_cache.get(name_off)
        if s is None:
            s = self._name_cache[name_off] = self._str(name_off)
        return s

    def _vlen(self, tid: int) -> int:
        return self._words[self._base(tid) + 1] & 0xFFFFFF

    def _kind_flag(self, tid: int) -> bool:
        return bool(self._words[self._base(tid) + 1] >> 31)

    def _ref(self, tid: int) -> int:
        """The size_or_type word: `type` for references, `size` for sized kinds."""
        return self._words[self._base(tid) + 2]

    def _members(self, tid: int) -> list[tuple[int, int, int]]:
        """(name_off, type, offset word) for each STRUCT/UNION member."""
        b = self._base(tid) + 3
        w = self._words
        return [(w[b + 3 * j], w[b + 3 * j + 1], w[b + 3 * j + 2]) for j in range(self._vlen(tid))]

    def members(self, tid: int) -> list[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size or 0) of each member of a STRUCT/UNION id."""
        if self.kind(tid) not in (STRUCT, UNION):
            raise BtfError(f"type id {tid} is {self.kind_name(tid)}, not a struct or union")
        kflag = self._kind_flag(tid)
        out = []
        for name_off, mtype, off in self._members(tid):
            bit_off, bf_size = _split_member_offset(off, kflag)
            out.append((self._name(name_off), mtype, bit_off, bf_size))
        return out

    def _int_encoding(self, tid: int) -> tuple[int, int]:
        """(bit offset, bits) of an INT."""
        enc = self._words[self._base(tid) + 3]
        return (enc >> 16) & 0xFF, enc & 0xFF

    # ------------------------------------------------------------------ type resolution

    def resolve(self, tid: int) -> int:
        """Skip typedefs and qualifiers (const, volatile, restrict, type tags)."""
        for _ in range(_MAX_CHAIN):
            if self.kind(tid) not in _MODIFIERS:
                return tid
            tid = self._ref(tid)
        raise BtfError(f"BTF reference chain too long at type id {tid} (corrupt BTF?)")

    def size_of(self, tid: int) -> int:
        t = self.resolve(tid)
        k = self.kind(t)
        if k in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return self._ref(t)
        if k == PTR:
            return self.pointer_size
        if k == ARRAY:
            b = self._base(t) + 3
            elem, nelems = self._words[b], self._words[b + 2]
            return nelems * self.size_of(elem)
        raise BtfError(f"type '{self.type_name(tid)}' ({KIND_NAMES.get(k, k)}) has no size")

    @property
    def pointer_size(self) -> int:
        """BTF does not record it; like libbpf, infer it from the size of 'long'."""
        cached = getattr(self, "_ptr_size", None)
        if cached is None:
            cached = 8
            for i in range(1, len(self._offs)):
                if self.kind(i) == INT and self.name(i) in ("long int", "long unsigned int"):
                    cached = self._ref(i)
                    break
            self._ptr_size = cached
        return cached

    def type_name(self, tid: int) -> str:
        """C spelling of a type: "struct sock *", "int", "bool", "char[16]", "void (*)(int)"."""
        return self._spell(tid, 0)

    def _spell(self, tid: int, depth: int) -> str:
        if depth > _MAX_CHAIN:
            raise BtfError(f"BTF reference chain too long at type id {tid} (corrupt BTF?)")
        k = self.kind(tid)
        if tid == 0:
            return "void"
        name = self.name(tid)
        if k in (INT, FLOAT, TYPEDEF, FUNC, VAR, DATASEC):
            return name
        if k in (STRUCT, UNION, ENUM, ENUM64):
            tag = {STRUCT: "struct", UNION: "union"}.get(k, "enum")
            return f"{tag} {name or '{...}'}"
        if k == FWD:
            return f"{'union' if self._kind_flag(tid) else 'struct'} {name}"
        if k in (TYPE_TAG, DECL_TAG):
            return self._spell(self._ref(tid), depth + 1)
        if k in _QUALIFIER_WORDS:
            target = self._ref(tid)
            inner = self._spell(target, depth + 1)
            if self.kind(self._skip_tags(target)) == PTR:
                return f"{inner} {_QUALIFIER_WORDS[k]}"
            return f"{_QUALIFIER_WORDS[k]} {inner}"
        if k == PTR:
            target = self._skip_tags(self._ref(tid))
            tk = self.kind(target)
            if tk == FUNC_PROTO:
                ret, args = self._proto_parts(target, depth + 1)
                return f"{ret} (*)({args})"
            if tk == ARRAY:
                elem, dims = self._array_parts(target, depth + 1)
                return f"{elem} (*){dims}"
            inner = self._spell(target, depth + 1)
            return f"{inner}*" if inner.endswith("*") else f"{inner} *"
        # The same parts as the pointer cases above, without the (*) a pointer's declarator needs.
        if k == ARRAY:
            elem, dims = self._array_parts(tid, depth + 1)
            return f"{elem}{dims}"
        if k == FUNC_PROTO:
            ret, args = self._proto_parts(tid, depth + 1)
            return f"{ret} ({args})"
        return f"<{KIND_NAMES.get(k, f'kind {k}')} #{tid}>"

    def _skip_tags(self, tid: int) -> int:
        for _ in range(_MAX_CHAIN):
            if self.kind(tid) != TYPE_TAG:
                return tid
            tid = self._ref(tid)
        raise BtfError(f"BTF type tag chain too long at type id {tid} (corrupt BTF?)")

    def _array_parts(self, tid: int, depth: int) -> tuple[str, str]:
        dims = ""
        while self.kind(tid) == ARRAY:
            b = self._base(tid) + 3
            dims += f"[{self._words[b + 2]}]"
            tid = self._words[b]
        return self._spell(tid, depth), dims

    def _proto_params(self, proto: int) -> list[tuple[str, int]]:
        b = self._base(proto) + 3
        w = self._words
        return [(self._name(w[b + 2 * j]), w[b + 2 * j + 1]) for j in range(self._vlen(proto))]

    def _proto_parts(self, proto: int, depth: int) -> tuple[str, str]:
        params = self._proto_params(proto)
        args = ", ".join("..." if (t == 0 and not n) else self._spell(t, depth) for n, t in params)
        return self._spell(self._ref(proto), depth), args or "void"

    # ------------------------------------------------------------------ lookups by name

    def find(self, name: str, kind: int | None = None) -> list[int]:
        """Ids of STRUCT/UNION/FUNC types called `name` (only those kinds are indexed)."""
        if kind is not None and kind not in (STRUCT, UNION, FUNC):
            raise BtfError(f"only STRUCT, UNION and FUNC are indexed by name, not {KIND_NAMES.get(kind)}")
        ids = self._by_name.get(name, [])
        return [i for i in ids if kind is None or self.kind(i) == kind]

    def type_exists(self, name: str) -> bool:
        """True for "sock", "struct sock" or "union bpf_attr" when the BTF defines it."""
        return bool(self._aggregates(name))

    def func_exists(self, name: str) -> bool:
        return bool(self.find(name, FUNC))

    def _aggregates(self, spelled: str) -> list[int]:
        parts = spelled.split()
        if len(parts) == 2 and parts[0] in ("struct", "union"):
            return self.find(parts[1], STRUCT if parts[0] == "struct" else UNION)
        if len(parts) == 1:
            return self.find(parts[0], STRUCT) or self.find(parts[0], UNION)
        raise BtfError(f"not a struct or union name: '{spelled}'")

    # ------------------------------------------------------------------ members

    def member(self, struct_name: str, path: str) -> Member:
        """Locate `path` (dotted, e.g. "__sk_common.skc_family") inside a struct or union.

        Anonymous struct/union members are searched transparently, as C does.
        """
        ids = self._aggregates(struct_name)
        bare = struct_name.split()[-1]
        if not ids:
            raise BtfError(f"struct {bare} is not in BTF")
        if not path or any(not p for p in path.split(".")):
            raise BtfError(f"bad member path '{path}' for struct {bare}")
        found: dict[Member, int] = {}
        first_error: BtfError | None = None
        for sid in ids:
            try:
                found.setdefault(self._member_in(sid, bare, path), sid)
            except BtfError as e:
                first_error = first_error or e
        if not found:
            assert first_error is not None
            raise first_error
        if len(found) > 1:
            # Non-deduplicated duplicates that disagree: refuse to guess.
            where = ", ".join(f"id {sid} -> offset {m.offset_bytes}" for m, sid in found.items())
            raise BtfError(f"struct {bare}.{path} is ambiguous: {len(ids)} definitions disagree ({where})")
        return next(iter(found))

    def _member_in(self, sid: int, bare: str, path: str) -> Member:
        parts = path.split(".")
        cur, cur_label, bits = sid, f"{'union' if self.kind(sid) == UNION else 'struct'} {bare}", 0
        for depth, part in enumerate(parts):
            hit = self._find_member(cur, part, 0)
            if hit is None:
                where = f" (looking up '{bare}.{path}')" if depth else ""
                raise BtfError(f"{cur_label} has no member '{part}'{where}")
            mtype, moff, bf_size = hit
            bits += moff
            if depth == len(parts) - 1:
                return self._make_member(mtype, bits, bf_size)
            inner = self.resolve(mtype)
            if self.kind(inner) not in (STRUCT, UNION):
                done = ".".join(parts[: depth + 1])
                raise BtfError(
                    f"{bare}.{done} is '{self.type_name(mtype)}', not a struct or union; "
                    f"cannot look up '{parts[depth + 1]}' in it (pointers are not followed)"
                )
            cur, cur_label = inner, self.type_name(inner)
        raise AssertionError("unreachable")  # pragma: no cover

    def _find_member(self, sid: int, name: str, base_bits: int) -> tuple[int, int, int] | None:
        """(type id, bit offset from the outer struct, bitfield size) or None; depth-first."""
        kflag = self._kind_flag(sid)
        for name_off, mtype, off in self._members(sid):
            bit_off, bf_size = _split_member_offset(off, kflag)
            if name_off:
                if self._name(name_off) == name:
                    return mtype, base_bits + bit_off, bf_size
                continue
            inner = self.resolve(mtype)
            if self.kind(inner) in (STRUCT, UNION):
                hit = self._find_member(inner, name, base_bits + bit_off)
                if hit is not None:
                    return hit
        return None

    def _make_member(self, mtype: int, bits: int, bf_size: int) -> Member:
        size = self.size_of(mtype)
        if not bf_size:
            # Without kind_flag, a bitfield shows up as an INT narrower than its storage, or as an
            # offset that is not byte aligned.
            inner = self.resolve(mtype)
            if self.kind(inner) == INT:
                int_off, int_bits = self._int_encoding(inner)
                if int_off or int_bits != size * 8:
                    bf_size = int_bits
            if bits % 8 and not bf_size:
                bf_size = size * 8
        return Member(
            offset_bytes=bits // 8,
            size_bytes=size,
            type_name=self.type_name(mtype),
            bitfield=bool(bf_size),
            bit_offset=bits,
            bit_size=bf_size,
            type_id=mtype,
        )

    # ------------------------------------------------------------------ functions

    def func_signature(self, func_name: str) -> FuncSignature:
        ids = self.find(func_name, FUNC)
        if not ids:
            raise BtfError(f"function {func_name} is not in BTF")
        sigs = {self._signature(fid, func_name) for fid in ids}
        if len(sigs) > 1:
            # Static functions in different files can share a name with different prototypes.
            shown = " | ".join(sorted(s.c_decl() for s in sigs))
            raise BtfError(f"function {func_name} has {len(sigs)} different prototypes in BTF: {shown}")
        return sigs.pop()

    def _signature(self, fid: int, func_name: str) -> FuncSignature:
        proto = self._ref(fid)
        if self.kind(proto) != FUNC_PROTO:
            raise BtfError(f"FUNC {func_name} (id {fid}) does not point to a FUNC_PROTO")
        params = tuple(
            ("", "...") if (t == 0 and not n) else (n, self.type_name(t))
            for n, t in self._proto_params(proto)
        )
        return FuncSignature(func_name, self.type_name(self._ref(proto)), params)

    def func_params(self, func_name: str) -> list[tuple[str, str]]:
        """[(param name, C type)], e.g. [("sk", "struct sock *"), ("arg", "struct proto_accept_arg *")]."""
        return list(self.func_signature(func_name).params)

    def func_return_type(self, func_name: str) -> str:
        return self.func_signature(func_name).return_type
