"""export: output paths refused up front, atomic JSON rewrites, NDJSON event log."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from accept_watch.daemon.clock import ClockMap, iso_utc
from accept_watch.daemon.eventlog import NdjsonEncoder
from accept_watch.daemon.export import (
    EventWriter,
    ExportError,
    check_writable,
    event_to_dict,
    write_json_atomic,
)
from accept_watch.probes.eventring import STRIDE, decode_event, pack_event
from accept_watch.probes.records import AcceptEvent, EventSource

S = 1_000_000_000


def _event(i: int, family: int = socket.AF_INET) -> AcceptEvent:
    v6 = family == socket.AF_INET6
    return AcceptEvent(
        ts_ns=10 * S + i, pid=4000 + i, tid=4100 + i, comm="gunicorn", family=family,
        local_addr="::1" if v6 else "127.0.0.1", local_port=8000,
        peer_addr="::1" if v6 else "127.0.0.1", peer_port=50000 + i,
        queue_wait_ns=1500 if i % 2 == 0 else None, backlog=i, backlog_limit=128, listener_inode=4242,
        source=EventSource.SYSCALL_EXIT,
    )


def _clock() -> ClockMap:
    return ClockMap(wall_clock=lambda: 1_700_000_000 * S, mono_clock=lambda: 0)


# ---------------------------------------------------------------------------------------------------
def test_check_writable_accepts_a_good_path_and_leaves_nothing(tmp_path: Path) -> None:
    check_writable(tmp_path / "run.json")
    check_writable(tmp_path / "run.json", what="events")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "existing.json").write_text("{}")
    check_writable(tmp_path / "existing.json")
    assert (tmp_path / "existing.json").read_text() == "{}"


def test_check_writable_missing_directory(tmp_path: Path) -> None:
    p = tmp_path / "nope" / "run.json"
    with pytest.raises(ExportError) as exc:
        check_writable(p)
    assert str(exc.value) == f"cannot write export to {p}: directory does not exist"


def test_check_writable_parent_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_text("x")
    p = f / "run.json"
    with pytest.raises(ExportError) as exc:
        check_writable(p)
    assert str(exc.value) == f"cannot write export to {p}: {f} is not a directory"
    deeper = f / "a" / "b.json"
    with pytest.raises(ExportError) as exc:
        check_writable(deeper)
    assert str(exc.value) == f"cannot write export to {deeper}: {f} is not a directory"


def test_check_writable_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as exc:
        check_writable(tmp_path)
    assert str(exc.value) == (f"cannot write export to {tmp_path}: "
                              "it is a directory, not a regular file; not replaced")


def test_check_writable_unwritable_directory() -> None:
    # We run as root, so permission bits would not stop us; /proc refuses new files to everyone.
    with pytest.raises(ExportError) as exc:
        check_writable("/proc/run.json", what="events")
    msg = str(exc.value)
    assert msg.startswith("cannot write events to /proc/run.json: ")
    assert "\n" not in msg


def test_check_writable_read_only_directory_for_a_user() -> None:
    """Permission bits, as an unprivileged user (root would ignore them): run the check as nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the nobody user")
    d = Path(tempfile.mkdtemp(prefix="aw-ro-"))
    try:
        d.chmod(0o555)  # nobody may enter but not create
        code = "import sys; from accept_watch.daemon.export import check_writable as c; c(sys.argv[1])"
        r = subprocess.run([sys.executable, "-c", code, str(d / "run.json")], user=65534, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1
        last = r.stderr.strip().splitlines()[-1]
        assert last == (
            "accept_watch.daemon.safefile.ExportError: "
            f"cannot write export to {d}/run.json: permission denied"
        )
        d.chmod(0o777)  # control: the same check passes once the directory is writable
        r = subprocess.run([sys.executable, "-c", code, str(d / "run.json")], user=65534, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert list(d.iterdir()) == []
    finally:
        d.chmod(0o700)
        d.rmdir()


# ---------------------------------------------------------------------------------------------------
def test_write_json_atomic_roundtrip_and_replace(tmp_path: Path) -> None:
    p = tmp_path / "run.json"
    write_json_atomic(p, {"schema": "accept-watch/1", "n": 1})
    assert json.loads(p.read_text()) == {"schema": "accept-watch/1", "n": 1}
    inode_before = p.stat().st_ino
    write_json_atomic(p, {"n": 2, "workers": [{"pid": 1}]})
    assert json.loads(p.read_text()) == {"n": 2, "workers": [{"pid": 1}]}
    assert p.stat().st_ino != inode_before  # replaced by rename, never rewritten in place
    assert [x.name for x in tmp_path.iterdir()] == ["run.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "run.json"
    write_json_atomic(p, {"n": 1})
    with pytest.raises(TypeError):
        write_json_atomic(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"n": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["run.json"]


def test_write_json_atomic_missing_directory(tmp_path: Path) -> None:
    p = tmp_path / "gone" / "run.json"
    with pytest.raises(ExportError) as exc:
        write_json_atomic(p, {})
    assert str(exc.value) == f"cannot write export to {p}: no such file or directory"


# ---------------------------------------------------------------------------------------------------
def test_event_writer_lines(tmp_path: Path) -> None:
    p = tmp_path / "events.ndjson"
    with EventWriter(p, clock=_clock()) as w:
        w.write(_event(0))
        w.write(_event(1, socket.AF_INET6))
        assert w.written == 2
    lines = p.read_text().splitlines()
    assert len(lines) == 2
    a, b = (json.loads(x) for x in lines)
    assert a["ts"] == iso_utc(1_700_000_010 * S) == "2023-11-14T22:13:30.000000+00:00"
    assert b["ts"] == "2023-11-14T22:13:30.000000+00:00" and b["ts_ns"] == 10 * S + 1
    assert (a["pid"], a["tid"], a["comm"], a["family"], a["source"]) == (4000, 4100, "gunicorn", "ipv4",
                                                                         "syscall_exit")
    assert (a["queue_wait_ns"], b["queue_wait_ns"]) == (1500, None)
    assert (b["family"], b["local_addr"], b["peer_port"], b["backlog"]) == ("ipv6", "::1", 50001, 1)
    expected = {"ts", "ts_ns", "pid", "tid", "comm", "family", "local_addr", "local_port", "peer_addr",
                "peer_port", "queue_wait_ns", "backlog", "backlog_limit", "listener_inode", "source"}
    assert set(a) == expected


def _events(n: int) -> list[AcceptEvent]:
    """Every combination the kernel makes: IPv4/IPv6, wait known or not, listener known or not."""
    out = []
    for i in range(n):
        ev = _event(i, socket.AF_INET6 if i % 3 == 0 else socket.AF_INET)
        if i % 5 == 0:
            ev = dataclasses.replace(ev, backlog=None, backlog_limit=None, listener_inode=None)
        out.append(dataclasses.replace(ev, comm=["nginx", 'we"ird\\', "gunicorn"][i % 3],
                                       local_port=8000 + i % 2, ts_ns=ev.ts_ns + i * 999_999_937))
    return out


def test_block_encoding_equals_the_per_event_dicts() -> None:
    """The fast encoder (one block of ring records at a time) writes what event_to_dict + json did."""
    clock = _clock()
    evs = _events(60)
    text, n = NdjsonEncoder(clock).encode(b"".join(pack_event(e) for e in evs))
    assert n == 60
    assert [json.loads(line) for line in text.splitlines()] == [event_to_dict(e, clock) for e in evs]
    # decode_event reads back what pack_event wrote (the dashboard's recent events go that way)
    assert [decode_event(pack_event(e)[8:]) for e in evs] == evs


def test_block_encoding_filters_ports_and_samples() -> None:
    evs = _events(100)
    block = b"".join(pack_event(e) for e in evs)
    text, n = NdjsonEncoder(_clock(), ports=[8001]).encode(block)
    assert n == 50 and {json.loads(line)["local_port"] for line in text.splitlines()} == {8001}
    enc = NdjsonEncoder(_clock(), sample=7)
    # sampling counts across blocks: records 0, 7, 14, ... of the whole stream
    parts = [enc.encode(block[: 33 * STRIDE]), enc.encode(block[33 * STRIDE:])]
    lines = [json.loads(line) for text, _ in parts for line in text.splitlines()]
    assert [d["ts_ns"] for d in lines] == [e.ts_ns for e in evs[::7]]
    assert all(d["sampled_1_in"] == 7 for d in lines)
    with pytest.raises(ValueError):
        NdjsonEncoder(_clock(), sample=0)


def test_event_writer_appends(tmp_path: Path) -> None:
    p = tmp_path / "events.ndjson"
    for i in range(2):
        with EventWriter(p, clock=_clock()) as w:
            w.write(_event(i))
    assert [json.loads(x)["pid"] for x in p.read_text().splitlines()] == [4000, 4001]


def test_event_writer_flushes_periodically(tmp_path: Path) -> None:
    lazy = EventWriter(tmp_path / "lazy.ndjson", clock=_clock(), flush_every_s=3600)
    eager = EventWriter(tmp_path / "eager.ndjson", clock=_clock(), flush_every_s=0)
    try:
        lazy.write(_event(0))
        eager.write(_event(0))
        assert (tmp_path / "lazy.ndjson").read_text() == ""  # buffered until the interval passes
        assert len((tmp_path / "eager.ndjson").read_text().splitlines()) == 1
        lazy.flush()
        assert len((tmp_path / "lazy.ndjson").read_text().splitlines()) == 1
    finally:
        lazy.close()
        eager.close()


def test_event_writer_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"^cannot write events to /proc/events\.ndjson: "):
        EventWriter("/proc/events.ndjson")
    w = EventWriter(tmp_path / "e.ndjson")
    w.close()
    w.close()  # idempotent
    with pytest.raises(ExportError, match="is closed"):
        w.write(_event(0))


def test_clock_map() -> None:
    c = ClockMap(wall_clock=lambda: 1_000 * S + 7, mono_clock=lambda: 50 * S)
    assert c.wall_ns(50 * S) == 1_000 * S + 7
    assert c.wall_ns(51 * S) == 1_001 * S + 7
    assert c.rel_s(52 * S) == 2.0
    assert iso_utc(1_000 * S + 123_456_789) == "1970-01-01T00:16:40.123456+00:00"
    assert c.iso(50 * S) == "1970-01-01T00:16:40.000000+00:00"
