"""The real kernel: /sys/kernel/btf/vmlinux read by accept-watch's parser, cross-checked against
bpftool's dump."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from accept_watch.probes.btf import Btf
from accept_watch.probes.offsets import (
    AcceptProto,
    load_layout,
    resolve_offsets,
)

VMLINUX = "/sys/kernel/btf/vmlinux"


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


