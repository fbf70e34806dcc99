"""BTF reader: header, kinds, members and functions, on small blobs built by tests/btfbuilder.py (no
kernel needed). The offsets, the layout cache and the real vmlinux have their own test_btf_* files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from accept_watch.probes.btf import Btf, BtfError
from accept_watch.probes.offsets import (
    REQUIRED,
)
from tests.btfbuilder import BtfBuilder, build_kernel


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


