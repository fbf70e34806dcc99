"""Kernel-offset resolution from BTF (synthetic kernels from tests/btfbuilder.py): struct offsets,
the accept prototype variants, refused fields, and where the listening fd is found at syscall exit."""

from __future__ import annotations

import os

import pytest

from accept_watch.probes.btf import Btf, BtfError
from accept_watch.probes.offsets import (
    REQUIRED,
    AcceptProto,
    resolve_offsets,
    syscall_arg1,
)
from tests.btfbuilder import BtfBuilder, build_kernel


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
