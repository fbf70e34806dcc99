"""kernel._TableReader's fallback when the kernel has no batch lookups for a map type (5.10 answers
ENOTSUPP for per-CPU arrays and leaves the count untouched: seen in the kernel matrix)."""

from __future__ import annotations

import ctypes
import errno
from types import SimpleNamespace
from typing import Any

import pytest

from accept_watch.probes import kernel


class _Table:
    Key = ctypes.c_int
    Leaf = ctypes.c_uint64 * 2  # a per-CPU value on two CPUs
    max_entries = 4
    map_fd = -1

    def items(self) -> list[tuple[Any, Any]]:
        return [(ctypes.c_int(i), self.Leaf(i, 10 * i)) for i in range(self.max_entries)]


def _fake_bcc(monkeypatch: pytest.MonkeyPatch, err: int) -> list[int]:
    calls: list[int] = []

    def lookup_batch(*_args: Any) -> int:
        calls.append(1)
        ctypes.set_errno(err)
        return -1

    lib = SimpleNamespace(bpf_lookup_batch=lookup_batch)
    monkeypatch.setattr(kernel, "_import_bcc", lambda: SimpleNamespace(libbcc=SimpleNamespace(lib=lib)))
    return calls


@pytest.mark.parametrize("err", [524, errno.EOPNOTSUPP, errno.EINVAL])
def test_unsupported_batch_falls_back_to_entry_by_entry(monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    calls = _fake_bcc(monkeypatch, err)
    reader = kernel._TableReader(b"diag", _Table())
    got = {k.value: sum(v) for k, v in reader.items()}
    assert got == {0: 0, 1: 11, 2: 22, 3: 33}
    assert not reader.batch_ok and calls == [1]
    list(reader.items())
    assert calls == [1]  # not tried again


def test_other_errors_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_bcc(monkeypatch, errno.EFAULT)
    with pytest.raises(kernel.ProbeError, match="reading BPF map diag failed"):
        list(kernel._TableReader(b"diag", _Table()).items())
