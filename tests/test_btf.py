"""BTF reader and kernel-offset resolver.

Most tests run on small BTF blobs built here byte by byte, so the parser is checked without a
kernel. The `kernel` tests read the real /sys/kernel/btf/vmlinux and cross-check against bpftool.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from accept_watch.probes import btf as B
from accept_watch.probes.btf import Btf, BtfError
from accept_watch.probes.offsets import (
    REQUIRED,
    AcceptProto,
    KernelLayout,
    load_layout,
    resolve_offsets,
    syscall_arg1,
)

VMLINUX = "/sys/kernel/btf/vmlinux"


# ---------------------------------------------------------------------- a tiny BTF writer


class BtfBuilder:
    """Emits real BTF bytes (Documentation/bpf/btf.rst); type ids are assigned from 1."""

    def __init__(self) -> None:
        self._strs = bytearray(b"\0")
        self._str_offs: dict[str, int] = {}
        self._types: list[bytes] = []
        self._order = "<"

    def _s(self, name: str) -> int:
        if not name:
            return 0
        if name not in self._str_offs:
            self._str_offs[name] = len(self._strs)
            self._strs += name.encode() + b"\0"
        return self._str_offs[name]

    def _add(self, name: str, kind: int, vlen: int, ref: int, extra: list[int], kflag: bool = False) -> int:
        info = (int(kflag) << 31) | (kind << 24) | vlen
        self._types.append((self._s(name), info, ref, *extra))  # packed at build() time
        return len(self._types)

    def int_(
        self, name: str, size: int, bits: int | None = None, signed: bool = False, bit_off: int = 0
    ) -> int:
        enc = (1 if signed else 0) << 24 | bit_off << 16 | (size * 8 if bits is None else bits)
        return self._add(name, B.INT, 0, size, [enc])

    def ptr(self, t: int) -> int:
        return self._add("", B.PTR, 0, t, [])

    def typedef(self, name: str, t: int) -> int:
        return self._add(name, B.TYPEDEF, 0, t, [])

    def const(self, t: int) -> int:
        return self._add("", B.CONST, 0, t, [])

    def volatile(self, t: int) -> int:
        return self._add("", B.VOLATILE, 0, t, [])

    def restrict(self, t: int) -> int:
        return self._add("", B.RESTRICT, 0, t, [])

    def type_tag(self, name: str, t: int) -> int:
        return self._add(name, B.TYPE_TAG, 0, t, [])

    def decl_tag(self, name: str, t: int, component: int) -> int:
        return self._add(name, B.DECL_TAG, 0, t, [component & 0xFFFFFFFF])

    def array(self, elem: int, index_type: int, n: int) -> int:
        return self._add("", B.ARRAY, 0, 0, [elem, index_type, n])

    def struct(
        self, name: str, size: int, members: list[tuple[str, int, int, int]], union: bool = False
    ) -> int:
        """members: (name, type, bit offset, bitfield size); any bitfield size sets kind_flag."""
        kflag = any(bf for *_, bf in members)
        extra: list[int] = []
        for mname, mtype, bit_off, bf in members:
            extra += [self._s(mname), mtype, (bf << 24 | bit_off) if kflag else bit_off]
        return self._add(name, B.UNION if union else B.STRUCT, len(members), size, extra, kflag)

    def enum(self, name: str, values: list[tuple[str, int]]) -> int:
        extra: list[int] = []
        for n, v in values:
            extra += [self._s(n), v & 0xFFFFFFFF]
        return self._add(name, B.ENUM, len(values), 4, extra)

    def enum64(self, name: str, values: list[tuple[str, int]]) -> int:
        extra: list[int] = []
        for n, v in values:
            extra += [self._s(n), v & 0xFFFFFFFF, v >> 32]
        return self._add(name, B.ENUM64, len(values), 8, extra)

    def fwd(self, name: str, union: bool = False) -> int:
        return self._add(name, B.FWD, 0, 0, [], kflag=union)

    def float_(self, name: str, size: int) -> int:
        return self._add(name, B.FLOAT, 0, size, [])

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        extra: list[int] = []
        for n, t in params:
            extra += [self._s(n), t]
        return self._add("", B.FUNC_PROTO, len(params), ret, extra)

    def func(self, name: str, proto: int, linkage: int = 1) -> int:
        return self._add(name, B.FUNC, linkage, proto, [])

    def var(self, name: str, t: int) -> int:
        return self._add(name, B.VAR, 0, t, [1])

    def datasec(self, name: str, size: int, vars_: list[tuple[int, int, int]]) -> int:
        extra: list[int] = []
        for t, off, sz in vars_:
            extra += [t, off, sz]
        return self._add(name, B.DATASEC, len(vars_), size, extra)

    def raw(self, kind: int, vlen: int, extra_words: int) -> int:
        """A record of an arbitrary (e.g. future) kind."""
        return self._add("", kind, vlen, 0, [0] * extra_words)

    def build(self, order: str = "<", layout: list[tuple[int, int]] | None = None) -> bytes:
        types = b"".join(struct.pack(f"{order}{len(t)}I", *t) for t in self._types)
        strs = bytes(self._strs)
        if layout is None:
            hdr = struct.pack(f"{order}HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strs))
            return hdr + types + strs
        lay = b"".join(struct.pack(f"{order}BBH", i, e, 0) for i, e in layout)
        hdr = struct.pack(
            f"{order}HBBIIIIIII", 0xEB9F, 1, 0, 32, 0, len(types), len(types), len(strs),
            len(types) + len(strs), len(lay),
        )  # fmt: skip
        return hdr + types + strs + lay


def build_kernel(
    *,
    accept: str = "sk_arg",
    family_size: int = 2,
    family_bitfield: bool = False,
    duplicate_sock: bool = False,
    sk_as_integer: bool = False,
    regs_helpers: bool = True,
    socket_in_socket_alloc_at: int = 0,
) -> tuple[BtfBuilder, dict[str, int]]:
    """A miniature 'vmlinux' with every struct in offsets.REQUIRED, at made-up offsets.

    Returns the builder and the ids of interesting types. Offsets deliberately differ from the real
    kernel so the tests prove they come from the blob.
    """
    b = BtfBuilder()
    ids: dict[str, int] = {}
    # Exotic kinds first: if skipping any of them were wrong, every later id would be off.
    u8 = b.int_("unsigned char", 1)
    u16 = b.int_("short unsigned int", 2)
    u32 = b.int_("unsigned int", 4)
    ulong = b.int_("long unsigned int", 8)
    sint = b.int_("int", 4, signed=True)
    b.float_("double", 8)
    b.enum("sk_state", [("TCP_ESTABLISHED", 1), ("TCP_LISTEN", 10)])
    b.enum64("big", [("HUGE", 1 << 40)])
    var = b.var("some_var", sint)
    b.datasec(".data..percpu", 8, [(var, 0, 4)])
    b.fwd("opaque")
    be16 = b.typedef("__be16", u16)
    be32 = b.typedef("__be32", u32)
    b16 = b.typedef("__u16", u16)
    u32t = b.typedef("u32", u32)
    cu32 = b.const(b.volatile(u32t))  # const volatile u32
    b.decl_tag("user", cu32, -1)
    bool_ = b.typedef("bool", b.int_("_Bool", 1))
    in6 = b.struct("in6_addr", 16, [("u6_addr8", b.array(u8, u32, 16), 0, 0)])
    inode = b.struct("inode", 96, [("i_mode", u16, 0, 0), ("i_ino", ulong, 8 * 40, 0)])
    file_ = b.struct(
        "file", 200,
        [("f_mode", u32, 0, 0), ("f_inode", b.ptr(inode), 8 * 48, 0), ("private_data", b.ptr(0), 8 * 56, 0)],
    )  # fmt: skip
    fdt = b.struct(
        "fdtable", 32,
        [("max_fds", u32, 0, 0), ("fd", b.ptr(b.type_tag("rcu", b.ptr(file_))), 8 * 16, 0)],
    )  # fmt: skip
    files = b.struct("files_struct", 256, [("count", sint, 0, 0), ("fdt", b.ptr(fdt), 8 * 40, 0)])
    b.struct("task_struct", 4000, [("pid", sint, 8 * 8, 0), ("files", b.ptr(files), 8 * 2000, 0)])
    # sock_common: the addresses live in an anonymous struct inside an anonymous union, which
    # itself starts at byte 8 so that nested offsets must be summed.
    addrs = b.struct("", 8, [("skc_daddr", be32, 0, 0), ("skc_rcv_saddr", be32, 32, 0)])
    addr_union = b.struct("", 8, [("skc_addrpair", ulong, 0, 0), ("", addrs, 0, 0)], union=True)
    ports = b.struct("", 4, [("skc_dport", be16, 0, 0), ("skc_num", b16, 16, 0)])
    port_union = b.struct("", 4, [("skc_portpair", u32, 0, 0), ("", ports, 0, 0)], union=True)
    fam_type = {2: u16, 4: u32}[family_size]
    skc = b.struct(
        "sock_common", 136,
        [
            ("skc_hash", u32, 0, 0),
            ("", addr_union, 8 * 8, 0),
            ("", port_union, 8 * 16, 0),
            ("skc_family", fam_type, 8 * 20, 3 if family_bitfield else 0),
            ("skc_state", b.volatile(u8), 8 * 24, 0),  # volatile unsigned char, as in the kernel
            ("skc_v6_daddr", in6, 8 * 64, 0),
            ("skc_v6_rcv_saddr", in6, 8 * 80, 0),
        ],
    )  # fmt: skip
    sock_members = [
        ("__sk_common", skc, 0, 0),
        ("sk_shutdown", u8, 8 * 140, 2),  # a kind_flag bitfield
        ("sk_padding", u8, 8 * 140 + 2, 1),
        ("sk_ack_backlog", u32t, 8 * 300, 0),
        ("sk_max_ack_backlog", cu32, 8 * 304, 0),
        ("sk_socket", b.ptr(b.fwd("socket")), 8 * 312, 0),  # struct socket is defined further down
        ("sk_protocol", u16, 8 * 144, 0),
    ]
    sock = b.struct("sock", 400, sock_members)
    if duplicate_sock:  # an un-deduplicated second definition that disagrees
        b.struct("sock", 400, [*sock_members[:3], ("sk_ack_backlog", u32t, 8 * 320, 0), *sock_members[4:]])
    sock_p = b.ptr(sock)
    inet = b.struct("inet_sock", 480, [("sk", sock, 0, 0), ("inet_sport", be16, 8 * 440, 0)])
    # tcp_sock.rcvq_space.time: a member of a named-less struct member, as in the kernel.
    u64 = b.typedef("u64", b.int_("long long unsigned int", 8))
    rcvq = b.struct("", 16, [("space", u32, 0, 0), ("seq", u32, 32, 0), ("time", u64, 64, 0)])
    b.struct("tcp_sock", 2200, [("inet_conn", inet, 0, 0), ("rcvq_space", rcvq, 8 * 1800, 0)])
    socket_members = [
        ("state", sint, 0, 0),
        ("file", b.ptr(file_), 8 * 32, 0),
        ("sk", ulong if sk_as_integer else sock_p, 8 * 40, 0),
    ]
    socket = b.struct("socket", 64, socket_members)
    b.struct(
        "socket_alloc", 160,
        [("socket", socket, 8 * socket_in_socket_alloc_at, 0), ("vfs_inode", inode, 8 * 64, 0)],
    )  # fmt: skip
    ids.update(sock=sock, sock_common=skc, file=file_, sint=sint, u32=u32)
    if accept == "sk_arg":
        arg = b.struct("proto_accept_arg", 16, [("flags", sint, 0, 0), ("err", sint, 32, 0)])
        proto = b.func_proto(sock_p, [("sk", sock_p), ("arg", b.ptr(arg))])
        ids["accept"] = b.func("inet_csk_accept", proto, linkage=0)
    elif accept == "sk_flags_err_kern":
        proto = b.func_proto(sock_p, [("sk", sock_p), ("flags", sint), ("err", b.ptr(sint)), ("kern", bool_)])
        ids["accept"] = b.func("inet_csk_accept", proto)
    elif accept == "weird":
        proto = b.func_proto(sock_p, [("sk", sock_p)])
        ids["accept"] = b.func("inet_csk_accept", proto)
    # Saved user registers (x86_64 spelling) and the helpers that reach them (5.15+).
    regs = [("r15", ulong, 0, 0), ("di", ulong, 8 * 112, 0), ("orig_ax", ulong, 8 * 120, 0)]
    b.struct("pt_regs", 168, regs)
    if regs_helpers:
        for helper in ("bpf_get_current_task_btf", "bpf_task_pt_regs"):
            b.func(helper, b.func_proto(ulong, [("", ulong)]))
    # A variadic function and a function pointer, for spelling.
    b.func("_printk", b.func_proto(sint, [("fmt", b.ptr(b.const(b.int_("char", 1, signed=True)))), ("", 0)]))
    return b, ids


@pytest.fixture(scope="module")
def kernel_btf() -> Btf:
    b, _ = build_kernel()
    return Btf.from_bytes(b.build())


# ---------------------------------------------------------------------- header / kinds


def test_every_kind_is_indexed_and_skipped() -> None:
    b = BtfBuilder()
    i = b.int_("int", 4, signed=True)
    expected = {
        i: "INT",
        b.ptr(i): "PTR",
        b.array(i, i, 3): "ARRAY",
        b.struct("s", 8, [("a", i, 0, 0), ("b", i, 32, 0)]): "STRUCT",
        b.struct("u", 4, [("a", i, 0, 0)], union=True): "UNION",
        b.enum("e", [("A", 1), ("B", 2), ("C", 3)]): "ENUM",
        b.fwd("f"): "FWD",
        b.typedef("t", i): "TYPEDEF",
        b.volatile(i): "VOLATILE",
        b.const(i): "CONST",
        b.restrict(i): "RESTRICT",
        (proto := b.func_proto(i, [("x", i), ("y", i)])): "FUNC_PROTO",
        b.var("v", i): "VAR",
        b.datasec(".data", 8, [(i, 0, 4), (i, 4, 4)]): "DATASEC",
        b.float_("float", 4): "FLOAT",
        b.decl_tag("tag", i, -1): "DECL_TAG",
        b.type_tag("user", i): "TYPE_TAG",
        b.enum64("e64", [("X", 1 << 33), ("Y", 2)]): "ENUM64",
    }
    fn = b.func("fn", proto)
    expected[fn] = "FUNC"
    last = b.struct("after_all", 4, [("z", i, 0, 0)])
    expected[last] = "STRUCT"
    btf = Btf.from_bytes(b.build())
    assert len(btf) == last
    assert {tid: btf.kind_name(tid) for tid in expected} == expected
    assert btf.name(last) == "after_all"
    assert btf.member("after_all", "z").type_name == "int"
    assert btf.func_params("fn") == [("x", "int"), ("y", "int")]


def test_big_endian_blob_parses_the_same(kernel_btf: Btf) -> None:
    b, _ = build_kernel()
    be = Btf.from_bytes(b.build(order=">"))
    for name, (s, path) in REQUIRED.items():
        assert be.member(s, path) == kernel_btf.member(s, path), name


def test_unknown_kind_needs_layout_section() -> None:
    b = BtfBuilder()
    i = b.int_("int", 4)
    b.raw(kind=25, vlen=2, extra_words=1 + 2 * 2)  # a future kind: 4-byte info + 2 x 8-byte elements
    b.struct("s", 4, [("x", i, 0, 0)])
    with pytest.raises(BtfError, match="unknown BTF kind 25 at type id 2"):
        Btf.from_bytes(b.build())
    layout = [(0, 0)] * 25 + [(4, 8)]
    btf = Btf.from_bytes(b.build(layout=layout))
    assert len(btf) == 3
    assert btf.member("s", "x").size_bytes == 4


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:10], "shorter than"),
        (lambda d: b"\x00\x00" + d[2:], "bad magic"),
        (lambda d: d[:2] + b"\x02" + d[3:], "unsupported BTF version 2"),
        (lambda d: d[:-40], "out of bounds"),
        # Claim one fewer word of types: the last record is cut.
        (lambda d: d[:12] + struct.pack("<I", struct.unpack_from("<I", d, 12)[0] - 4) + d[16:], "truncated"),
    ],
)
def test_malformed_blobs_are_rejected(mangle, message: str) -> None:
    b = BtfBuilder()
    i = b.int_("int", 4)
    b.struct("s", 8, [("a", i, 0, 0), ("b", i, 32, 0)])
    data = b.build()
    Btf.from_bytes(data)  # the unmangled blob is fine
    with pytest.raises(BtfError, match=message):
        Btf.from_bytes(mangle(data))


def test_load_reports_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match=r"cannot read BTF from .*nope"):
        Btf.load(str(tmp_path / "nope"))


# ---------------------------------------------------------------------- members


def test_member_through_anonymous_union_and_struct(kernel_btf: Btf) -> None:
    daddr = kernel_btf.member("sock", "__sk_common.skc_daddr")
    assert (daddr.offset_bytes, daddr.size_bytes, daddr.type_name, daddr.bitfield) == (8, 4, "__be32", False)
    assert kernel_btf.member("sock", "__sk_common.skc_rcv_saddr").offset_bytes == 12
    assert kernel_btf.member("sock_common", "skc_num").offset_bytes == 18
    assert kernel_btf.member("struct sock_common", "skc_dport").offset_bytes == 16
    assert kernel_btf.member("sock", "__sk_common.skc_addrpair").size_bytes == 8


def test_member_sizes_resolve_typedefs_qualifiers_arrays(kernel_btf: Btf) -> None:
    m = kernel_btf.member("sock", "sk_max_ack_backlog")  # const volatile u32
    assert (m.offset_bytes, m.size_bytes, m.type_name) == (304, 4, "const volatile u32")
    v6 = kernel_btf.member("sock", "__sk_common.skc_v6_daddr")
    assert (v6.offset_bytes, v6.size_bytes, v6.type_name) == (64, 16, "struct in6_addr")
    assert kernel_btf.member("in6_addr", "u6_addr8").type_name == "unsigned char[16]"
    fd = kernel_btf.member("fdtable", "fd")  # pointer to a type-tagged pointer
    assert (fd.size_bytes, fd.type_name) == (8, "struct file **")
    assert kernel_btf.member("file", "private_data").type_name == "void *"


def test_bitfield_with_kind_flag(kernel_btf: Btf) -> None:
    m = kernel_btf.member("sock", "sk_padding")
    assert m.bitfield and (m.bit_offset, m.bit_size, m.offset_bytes, m.size_bytes) == (8 * 140 + 2, 1, 140, 1)
    assert kernel_btf.member("sock", "sk_shutdown").bit_size == 2
    assert not kernel_btf.member("sock", "sk_ack_backlog").bitfield


def test_bitfield_without_kind_flag() -> None:
    # The pre-kind_flag encoding: a bitfield is an INT whose bit count is below its storage size.
    b = BtfBuilder()
    u32 = b.int_("unsigned int", 4)
    narrow = b.int_("unsigned int", 4, bits=3)
    b.struct("s", 8, [("whole", u32, 0, 0), ("flags", narrow, 35, 0)])
    btf = Btf.from_bytes(b.build())
    m = btf.member("s", "flags")
    assert m.bitfield and (m.bit_offset, m.bit_size, m.offset_bytes) == (35, 3, 4)
    assert not btf.member("s", "whole").bitfield


def test_missing_member_messages(kernel_btf: Btf) -> None:
    with pytest.raises(BtfError, match=r"^struct sock has no member 'sk_nope'$"):
        kernel_btf.member("sock", "sk_nope")
    with pytest.raises(BtfError, match=r"^struct sock_common has no member 'skc_x' \(looking up 'sock\."):
        kernel_btf.member("sock", "__sk_common.skc_x")
    with pytest.raises(BtfError, match=r"socket\.sk is 'struct sock \*', not a struct.*pointers are not"):
        kernel_btf.member("socket", "sk.__sk_common")
    with pytest.raises(BtfError, match=r"^struct no_such_struct is not in BTF$"):
        kernel_btf.member("no_such_struct", "x")
    with pytest.raises(BtfError, match="bad member path"):
        kernel_btf.member("sock", "__sk_common..skc_num")


def test_disagreeing_duplicate_structs_are_refused() -> None:
    b, _ = build_kernel(duplicate_sock=True)
    btf = Btf.from_bytes(b.build())
    assert btf.member("sock", "__sk_common.skc_num").offset_bytes == 18  # both definitions agree
    with pytest.raises(BtfError, match="ambiguous"):
        btf.member("sock", "sk_ack_backlog")


def test_type_exists(kernel_btf: Btf) -> None:
    assert kernel_btf.type_exists("sock")
    assert kernel_btf.type_exists("struct sock")
    assert not kernel_btf.type_exists("union sock")
    assert not kernel_btf.type_exists("opaque")  # only a FWD
    assert kernel_btf.func_exists("inet_csk_accept")
    assert not kernel_btf.func_exists("sock")


# ---------------------------------------------------------------------- functions


def test_func_params_and_return(kernel_btf: Btf) -> None:
    assert kernel_btf.func_params("inet_csk_accept") == [
        ("sk", "struct sock *"),
        ("arg", "struct proto_accept_arg *"),
    ]
    assert kernel_btf.func_return_type("inet_csk_accept") == "struct sock *"
    sig = kernel_btf.func_signature("_printk")
    assert sig.params == (("fmt", "const char *"), ("", "..."))
    assert sig.c_decl() == "int _printk(const char *fmt, ...)"
    with pytest.raises(BtfError, match=r"^function nope is not in BTF$"):
        kernel_btf.func_params("nope")


def test_type_spelling() -> None:
    b = BtfBuilder()
    i = b.int_("int", 4, signed=True)
    c = b.int_("char", 1, signed=True)
    pp = b.ptr(b.ptr(i))
    cptr_const = b.const(b.ptr(c))
    arr2 = b.array(b.array(i, i, 3), i, 2)
    fnptr = b.ptr(b.func_proto(0, [("", i), ("", b.ptr(c))]))
    anon = b.struct("", 4, [("x", i, 0, 0)])
    fwd_union = b.fwd("later", union=True)
    btf = Btf.from_bytes(b.build())
    assert btf.type_name(pp) == "int **"
    assert btf.type_name(cptr_const) == "char * const"
    assert btf.type_name(arr2) == "int[2][3]"
    assert btf.type_name(fnptr) == "void (*)(int, char *)"
    assert btf.type_name(anon) == "struct {...}"
    assert btf.type_name(fwd_union) == "union later"
    assert btf.size_of(arr2) == 24
    with pytest.raises(BtfError, match="out of range"):
        btf.type_name(999)


# ---------------------------------------------------------------------- offsets


def test_resolve_offsets_from_synthetic_kernel() -> None:
    b, _ = build_kernel()
    layout = resolve_offsets(Btf.from_bytes(b.build()))
    d = layout.defines
    assert set(d) == {f"OFF_{n}" for n in REQUIRED}
    assert (d["OFF_TASK_FILES"], d["OFF_FILES_FDT"], d["OFF_FDT_FD"], d["OFF_SOCKET_SK"]) == (
        2000,
        40,
        16,
        40,
    )
    assert (d["OFF_SK_DADDR"], d["OFF_SK_RCV_SADDR"], d["OFF_SK_DPORT"]) == (8, 12, 16)
    assert (d["OFF_SK_FAMILY"], d["OFF_SK_V6_DADDR"], d["OFF_SK_ACK_BACKLOG"]) == (20, 64, 300)
    assert (d["OFF_SK_STATE"], d["OFF_INET_SPORT"], d["OFF_SK_PROTOCOL"]) == (24, 440, 144)
    assert (d["OFF_SK_SOCKET"], d["OFF_SOCKET_ALLOC_INO"]) == (312, 64 + 40)
    assert layout.accept_proto is AcceptProto.SK_ARG
    assert (
        layout.accept_proto_text == "inet_csk_accept(struct sock *sk, struct proto_accept_arg *arg) [6.10+]"
    )
    values = layout.define_values()
    assert values["OFF_SK_DPORT"] == 16 and values["ACCEPT_PROTO_SK_ARG"] == 1


@pytest.mark.parametrize(
    ("accept", "proto", "desc_part"),
    [
        (
            "sk_flags_err_kern",
            AcceptProto.SK_FLAGS_ERR_KERN,
            "(struct sock *sk, int flags, int *err, bool kern)",
        ),
        ("absent", AcceptProto.UNKNOWN, "not in BTF"),
        ("weird", AcceptProto.UNKNOWN, "unrecognised prototype"),
    ],
)
def test_accept_prototype_variants(accept: str, proto: AcceptProto, desc_part: str) -> None:
    b, _ = build_kernel(accept=accept)
    layout = resolve_offsets(Btf.from_bytes(b.build()))
    assert layout.accept_proto is proto
    assert desc_part in layout.accept_proto_text


def test_size_mismatch_names_the_field() -> None:
    b, _ = build_kernel(family_size=4)
    with pytest.raises(BtfError, match=r"sock\.__sk_common\.skc_family \(SK_FAMILY\) is 4 bytes.*expects 2"):
        resolve_offsets(Btf.from_bytes(b.build()))


def test_pointer_field_must_be_a_pointer() -> None:
    b, _ = build_kernel(sk_as_integer=True)  # right size, wrong kind
    with pytest.raises(
        BtfError, match=r"socket\.sk \(SOCKET_SK\) has type long unsigned int.*expects a pointer"
    ):
        resolve_offsets(Btf.from_bytes(b.build()))


def test_bitfield_field_is_refused() -> None:
    b, _ = build_kernel(family_bitfield=True)
    with pytest.raises(BtfError, match=r"skc_family \(SK_FAMILY\) is a bitfield \(3 bits"):
        resolve_offsets(Btf.from_bytes(b.build()))


def test_missing_required_member_is_an_error() -> None:
    b = BtfBuilder()
    sint = b.int_("int", 4)
    b.struct("task_struct", 8, [("pid", sint, 0, 0)])
    with pytest.raises(BtfError, match=r"^struct task_struct has no member 'files'$"):
        resolve_offsets(Btf.from_bytes(b.build()))


# ---------------------------------------------------------------------- cache


@pytest.fixture
def blob_file(tmp_path: Path) -> Path:
    b, _ = build_kernel()
    p = tmp_path / "vmlinux.btf"
    p.write_bytes(b.build())
    return p


def test_cache_miss_then_hit(blob_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load_layout(str(blob_file), cache=cache)
    assert (first.source, first.cache_status) == ("btf", "miss")
    doc = json.loads((cache / "kernel-layout.json").read_text())
    assert doc["layout"]["defines"] == first.defines
    second = load_layout(str(blob_file), cache=cache)
    assert (second.source, second.cache_status) == ("cache", "hit")
    assert second == first and second.accept_proto is AcceptProto.SK_ARG
    assert second.load_seconds >= 0
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # no temp files left over


def test_cache_is_keyed_by_blob(blob_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_layout(str(blob_file), cache=cache)
    b, _ = build_kernel(accept="sk_flags_err_kern")
    blob_file.write_bytes(b.build())
    other = load_layout(str(blob_file), cache=cache)
    assert (other.source, other.cache_status) == ("btf", "stale")
    assert other.accept_proto is AcceptProto.SK_FLAGS_ERR_KERN


_CACHE_DOC = (
    b'{"format": 2, "key": "KEY", "layout": {"defines": %s, "accept_proto": "%s", "accept_proto_text": "", '
    b'"syscall_arg1_off": 112, "syscall_arg1_text": ""}}'
)


@pytest.mark.parametrize(
    "garbage",
    [
        b"{not json",
        b"\xff\xfe\x00",
        _CACHE_DOC % (b"{}", b"sk_arg"),  # no defines
        _CACHE_DOC % (b"DEFS", b"bogus"),  # unknown prototype value
        _CACHE_DOC.replace(b"112", b"-7") % (b"DEFS", b"sk_arg"),  # impossible register offset
        _CACHE_DOC.replace(b'"format": 2', b'"format": 1') % (b"DEFS", b"sk_arg"),  # older format
        b"[1, 2]",
    ],
)
def test_corrupt_cache_is_ignored_and_rewritten(
    blob_file: Path, tmp_path: Path, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    good = load_layout(str(blob_file), cache=cache)
    path = cache / "kernel-layout.json"
    key = json.loads(path.read_text())["key"]
    path.write_bytes(
        garbage.replace(b"KEY", key.encode()).replace(b"DEFS", json.dumps(good.defines).encode())
    )
    with caplog.at_level("WARNING"):
        again = load_layout(str(blob_file), cache=cache)
    assert (again.source, again.cache_status) == ("btf", "corrupt")
    assert again == good
    assert "corrupt layout cache" in caplog.text and "corrupt caches seen:" in caplog.text
    assert KernelLayout.from_json(json.loads(path.read_text())["layout"]) == good  # rewritten
    assert load_layout(str(blob_file), cache=cache).cache_status == "hit"


def test_unwritable_cache_still_returns_layout(blob_file: Path, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    layout = load_layout(str(blob_file), cache=not_a_dir / "cache")
    assert (layout.source, layout.cache_status) == ("btf", "unwritable")
    assert layout.accept_proto is AcceptProto.SK_ARG


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, blob_file: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_layout(str(blob_file))
    assert (tmp_path / "xdg" / "accept-watch" / "kernel-layout.json").is_file()


# ---------------------------------------------------------------------- the real kernel


def _require(path_ok: bool, what: str) -> None:
    """Skip locally when the machine lacks it; in CI a missing prerequisite is a failure."""
    if path_ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing but CI is set")
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="module")
def vmlinux() -> Btf:
    _require(os.path.exists(VMLINUX), VMLINUX)
    return Btf.load(VMLINUX)


@pytest.fixture(scope="module")
def bpftool_raw() -> str:
    _require(os.path.exists(VMLINUX), VMLINUX)
    tool = shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if os.access(p, os.X_OK)), None
    )
    _require(tool is not None, "bpftool")
    out = subprocess.run(
        [tool, "btf", "dump", "file", VMLINUX, "format", "raw"], capture_output=True, text=True, check=True
    )
    return out.stdout


_TYPE_LINE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'")
_MEMBER_LINE = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?$")


def _bpftool_struct_member(raw: str, struct_name: str, member: str) -> int:
    """bits_offset/8 of a direct member, from bpftool's raw dump."""
    m = re.search(rf"^\[\d+\] STRUCT '{struct_name}' .*\n((?:\t.*\n)*)", raw, re.M)
    assert m, f"bpftool has no struct {struct_name}"
    bits = re.search(rf"^\t'{member}' type_id=\d+ bits_offset=(\d+)", m.group(1), re.M)
    assert bits, f"bpftool has no {struct_name}.{member}"
    return int(bits.group(1)) // 8


@pytest.mark.kernel
def test_vmlinux_loads_fast() -> None:
    _require(os.path.exists(VMLINUX), VMLINUX)
    t0 = time.perf_counter()
    btf = Btf.load(VMLINUX)
    secs = time.perf_counter() - t0
    assert len(btf) > 10_000
    assert secs < 1.5, f"loading vmlinux BTF took {secs:.2f} s"


@pytest.mark.kernel
def test_vmlinux_sock_layout(vmlinux: Btf) -> None:
    common = vmlinux.member("sock", "__sk_common")
    assert (common.offset_bytes, common.type_name) == (0, "struct sock_common")
    fam = vmlinux.member("sock", "__sk_common.skc_family")
    assert fam.size_bytes == 2 and not fam.bitfield
    daddr = vmlinux.member("sock", "__sk_common.skc_daddr")  # anonymous struct in an anonymous union
    assert daddr.size_bytes == 4
    assert vmlinux.member("sock_common", "skc_daddr") == daddr


@pytest.mark.kernel
def test_vmlinux_accept_proto_matches_kernel_version(vmlinux: Btf) -> None:
    layout = resolve_offsets(vmlinux)
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    want = AcceptProto.SK_ARG if (major, minor) >= (6, 10) else AcceptProto.SK_FLAGS_ERR_KERN
    assert layout.accept_proto is want, layout.accept_proto_text


@pytest.mark.kernel
def test_vmlinux_offsets_match_bpftool(vmlinux: Btf, bpftool_raw: str) -> None:
    layout = resolve_offsets(vmlinux)
    assert layout.defines["OFF_SOCKET_SK"] == _bpftool_struct_member(bpftool_raw, "socket", "sk")
    assert layout.defines["OFF_SK_SOCKET"] == _bpftool_struct_member(bpftool_raw, "sock", "sk_socket")
    assert layout.defines["OFF_SOCKET_ALLOC_INO"] == _bpftool_struct_member(
        bpftool_raw, "socket_alloc", "vfs_inode"
    ) + _bpftool_struct_member(bpftool_raw, "inode", "i_ino")
    assert layout.defines["OFF_FILES_FDT"] == _bpftool_struct_member(bpftool_raw, "files_struct", "fdt")
    assert layout.defines["OFF_TASK_FILES"] == _bpftool_struct_member(bpftool_raw, "task_struct", "files")
    common = _bpftool_struct_member(bpftool_raw, "sock", "__sk_common")
    family = _bpftool_struct_member(bpftool_raw, "sock_common", "skc_family")
    assert layout.defines["OFF_SK_FAMILY"] == common + family


@pytest.mark.kernel
def test_vmlinux_every_type_and_member_matches_bpftool(vmlinux: Btf, bpftool_raw: str) -> None:
    """Every type's kind and name, and every struct/union member's offset and bitfield size, agree
    with bpftool: proves the record skipping is right for every kind the kernel uses."""
    kinds_seen: set[str] = set()
    n_types = n_members = 0
    members: list[tuple[str, int, int, int]] = []
    tid = 0
    for line in bpftool_raw.splitlines():
        t = _TYPE_LINE.match(line)
        if t:
            tid = int(t.group(1))
            kind, name = t.group(2), t.group(3)
            assert vmlinux.kind_name(tid) == kind, f"type {tid}"
            assert vmlinux.name(tid) == ("" if name == "(anon)" else name), f"type {tid}"
            kinds_seen.add(kind)
            n_types += 1
            members = vmlinux.members(tid) if kind in ("STRUCT", "UNION") else []
            idx = 0
            continue
        m = _MEMBER_LINE.match(line)
        if m and members:
            mname, mtype, bits, bf = members[idx]
            got = (mname or "(anon)", mtype, bits, bf)
            assert got == (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4) or 0)), f"type {tid}"
            idx += 1
            n_members += 1
    assert n_types == len(vmlinux)
    assert {"STRUCT", "UNION", "FUNC", "FUNC_PROTO", "PTR", "INT"} <= kinds_seen
    assert n_members > 10_000


@pytest.mark.kernel
def test_vmlinux_accept_params_match_bpftool(vmlinux: Btf, bpftool_raw: str) -> None:
    m = re.search(r"^\[\d+\] FUNC 'inet_csk_accept' type_id=(\d+)", bpftool_raw, re.M)
    if m is None:
        pytest.skip("inet_csk_accept is not in this kernel's BTF")
    proto = re.search(rf"^\[{m.group(1)}\] FUNC_PROTO .*\n((?:\t.*\n)*)", bpftool_raw, re.M)
    assert proto
    names = re.findall(r"^\t'([^']*)' type_id=", proto.group(1), re.M)
    assert [n for n, _ in vmlinux.func_params("inet_csk_accept")] == names


@pytest.mark.kernel
def test_load_layout_real_kernel(tmp_path: Path) -> None:
    _require(os.path.exists(VMLINUX), VMLINUX)
    first = load_layout(VMLINUX, cache=tmp_path)
    second = load_layout(VMLINUX, cache=tmp_path)
    assert (first.source, second.source) == ("btf", "cache")
    assert second == first
    assert second.load_seconds < first.load_seconds


# ---------------------------------------------------------------------- listening fd at syscall exit


def test_listener_from_saved_registers_where_helpers_and_layout_allow() -> None:
    b, _ = build_kernel()
    btf = Btf.from_bytes(b.build())
    assert syscall_arg1(btf, "x86_64") == (
        112, "listening fd read at syscall exit from the saved registers (pt_regs.di)"
    )
    layout = resolve_offsets(btf)
    if os.uname().machine == "x86_64":
        assert layout.listener_from_regs and layout.define_values()["OFF_PT_REGS_ARG1"] == 112
    assert layout.define_values()["LISTENER_FROM_REGS"] == int(layout.listener_from_regs)


@pytest.mark.parametrize(
    ("regs_helpers", "machine", "why"),
    [
        (False, "x86_64", "bpf_get_current_task_btf, bpf_task_pt_regs not in this kernel: 5.15+"),
        (True, "riscv64", "saved-register layout not known for riscv64"),
        (True, "aarch64", "pt_regs.orig_x0 not in BTF"),
    ],
)
def test_listener_stashed_by_sys_enter_otherwise(regs_helpers: bool, machine: str, why: str) -> None:
    b, _ = build_kernel(regs_helpers=regs_helpers)
    arg1, text = syscall_arg1(Btf.from_bytes(b.build()), machine)
    assert arg1 == -1
    assert text == f"listening fd stashed by sys_enter_accept* ({why})"


def test_socket_inode_needs_socket_first_in_socket_alloc() -> None:
    b, _ = build_kernel(socket_in_socket_alloc_at=8)
    with pytest.raises(BtfError, match=r"socket_alloc\.socket is not at offset 0"):
        resolve_offsets(Btf.from_bytes(b.build()))
