"""The layout cache: keyed by the BTF blob, corrupt or unwritable caches never block a layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accept_watch.probes.offsets import (
    AcceptProto,
    KernelLayout,
    load_layout,
)
from tests.btfbuilder import build_kernel

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


