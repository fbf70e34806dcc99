"""A tiny BTF writer: blobs built byte by byte, so the BTF parser and the offset resolver are tested
without a kernel. `build_kernel` makes a synthetic vmlinux with the structs accept-watch reads."""

from __future__ import annotations

import struct

from accept_watch.probes import btf as B


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

