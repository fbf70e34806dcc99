"""Issue 11, files and inputs: what root writes and reads when paths and inputs are hostile.

Everything here is refused before a probe is attached, so the real CLI runs against a real pid (this
test process) without needing eBPF. Nodes are made in a temporary directory; the real /dev/null is
never touched.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from accept_watch.daemon.export import EventWriter, ExportError, check_writable, write_json_atomic
from accept_watch.daemon.safefile import check_output
from tests.watcher import ACCEPT_WATCH, run_cli

REAL_EXPORT = Path(__file__).parent / "data" / "real_export.json"
ME = str(os.getpid())


def _one_line(proc: subprocess.CompletedProcess[str], *needles: str, rc: int = 1) -> str:
    assert proc.returncode == rc, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _nodes(tmp: Path) -> dict[str, Path]:
    """A FIFO, a socket, a directory, a symlink to a file and (when this host lets us) a char device."""
    nodes = {"a FIFO": tmp / "fifo", "a socket": tmp / "sock", "a directory": tmp / "dir",
             "a symbolic link": tmp / "link"}
    os.mkfifo(nodes["a FIFO"])
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(nodes["a socket"]))
    sock.close()
    nodes["a directory"].mkdir()
    (tmp / "precious").write_text("keep me\n")
    nodes["a symbolic link"].symlink_to(tmp / "precious")
    try:
        os.mknod(tmp / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
        nodes["a character device"] = tmp / "null"
    except PermissionError:
        pass
    return nodes


def _kinds(nodes: dict[str, Path]) -> dict[str, int]:
    return {name: stat.S_IFMT(os.lstat(p).st_mode) for name, p in nodes.items()}


@pytest.mark.parametrize("option", ["--export", "--events"])
def test_outputs_refuse_devices_fifos_sockets_dirs_and_symlinks(tmp_path: Path, option: str) -> None:
    nodes = _nodes(tmp_path)
    before = _kinds(nodes)
    what = "export" if option == "--export" else "events"
    for name, path in nodes.items():
        # A FIFO without a reader would block an append-open forever: a timeout is the old failure.
        proc = run_cli("--pid", ME, option, str(path), "--no-dashboard", "--duration", "1", timeout=30)
        _one_line(proc, f"cannot write {what} to {path}: it is {name}")
    assert _kinds(nodes) == before  # nothing replaced
    assert (tmp_path / "precious").read_text() == "keep me\n"


def test_atomic_write_rechecks_the_target_at_write_time(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    check_writable(target)  # fine at start-up...
    (tmp_path / "precious").write_text("keep me\n")
    target.symlink_to(tmp_path / "precious")  # ...then swapped for a symlink before the periodic write
    with pytest.raises(ExportError, match=r"it is a symbolic link; not followed$"):
        write_json_atomic(target, {"n": 1})
    assert target.is_symlink() and (tmp_path / "precious").read_text() == "keep me\n"
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(ExportError, match=r"it is a FIFO, not a regular file; not replaced$"):
        write_json_atomic(target, {"n": 1})
    assert stat.S_ISFIFO(os.lstat(target).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "run.json"]  # no temp file left


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_events_in_a_sticky_shared_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    secret = tmp_path / "root-only"
    secret.write_text("root data\n")
    secret.chmod(0o600)
    planted = shared / "events.ndjson"
    planted.symlink_to(secret)  # what an unprivileged user could plant
    with pytest.raises(ExportError, match="symbolic link"):
        EventWriter(planted)
    assert secret.read_text() == "root data\n"
    planted.unlink()
    planted.write_text("")
    os.chown(planted, 65534, 65534)  # a file of another user: it could swap it at any time
    with pytest.raises(ExportError, match=r"belongs to uid 65534 in the shared directory"):
        EventWriter(planted)
    mine = shared / "mine.ndjson"
    with EventWriter(mine):
        pass
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o600  # new event logs: owner only


def test_names_longer_than_255_bytes_are_one_line(tmp_path: Path) -> None:
    long_name = str(tmp_path / ("a" * 300 + ".json"))
    for option, what in (("--export", "export"), ("--events", "events")):
        proc = run_cli("--pid", ME, option, long_name, "--no-dashboard", "--duration", "1")
        _one_line(proc, f"cannot write {what} to", "file name too long")


def test_messages_name_the_file_kind_and_the_real_reason(tmp_path: Path) -> None:
    proc = run_cli("--pid", ME, "--events", str(tmp_path / "missing" / "e.ndjson"), "--no-dashboard")
    _one_line(proc, "cannot write events to", "directory does not exist")
    proc = run_cli("--pid", ME, "--export", "/proc/self/status", "--no-dashboard")
    line = _one_line(proc, "cannot write export to /proc/self/status", "proc pseudo-filesystem")
    assert "no such file" not in line


def _report(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    def limit_memory() -> None:  # an unbounded read fails here in seconds instead of eating the host
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run([*ACCEPT_WATCH, "report", *args], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit_memory)


def test_report_refuses_devices_fifos_and_oversized_files(tmp_path: Path) -> None:
    _one_line(_report("/dev/zero"), "/dev/zero: is a character device, not a regular file", rc=2)
    os.mkfifo(tmp_path / "fifo")
    _one_line(_report(str(tmp_path / "fifo")), "is a FIFO, not a regular file", rc=2)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(65 * 2**20)  # sparse: costs no disk
    _one_line(_report(str(big)), "larger than an export can be (64 MiB)", rc=2)


@pytest.mark.parametrize("mutate", [
    lambda d: d["workers"][1]["queue_wait_us"].__setitem__("p50", 1e308),
    lambda d: d["rate_history"][0].__setitem__(0, float("inf")),
    lambda d: d["rate_history"][0].__setitem__(0, float("nan")),
], ids=["p50-1e308", "rate-history-inf", "rate-history-nan"])
def test_report_html_with_out_of_range_numbers(tmp_path: Path, mutate) -> None:
    doc = json.loads(REAL_EXPORT.read_text())
    mutate(doc)
    path = tmp_path / "e.json"
    path.write_text(json.dumps(doc, allow_nan=True))
    proc = _report(str(path), "--html", str(tmp_path / "out.html"))
    _one_line(proc, str(path), rc=2)
    assert not (tmp_path / "out.html").exists()


def test_report_html_output_is_checked_like_exports(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    proc = _report(str(REAL_EXPORT), "--html", str(tmp_path / "fifo"))
    _one_line(proc, "it is a FIFO, not a regular file; not replaced", rc=2)


@pytest.mark.parametrize(("args", "needle"), [
    (["--duration", "inf"], "--duration: must be a number > 0 and <= 31622400"),
    (["--duration", "1e308"], "--duration: must be a number > 0"),
    (["--duration", "nan"], "--duration: must be a number > 0"),
    (["--interval", "1e-9"], "--interval: must be a number >= 0.1 and <= 60"),
    (["--interval", "3600"], "--interval: must be a number >= 0.1 and <= 60"),
    (["--token", "t" * 257], "--token: at most 256 characters"),
    (["--listen", "h" * 300 + ":80"], "--listen: not a host name or address"),
    (["--port", "1" * 40], "--port: not a TCP port"),
    (["--pid", "9" * 40], "--pid: not a process id"),
])
def test_inputs_are_bounded(args: list[str], needle: str) -> None:
    _one_line(run_cli("--pid", ME, *args) if args[0] != "--pid" else run_cli(*args), needle, rc=2)


def test_too_many_ports_is_one_line() -> None:
    args = [a for n in range(1, 70) for a in ("--port", str(1000 + n))]
    _one_line(run_cli("--pid", ME, *args), "at most 64 --port options", rc=2)


def test_check_output_accepts_a_plain_new_file(tmp_path: Path) -> None:
    check_output(tmp_path / "fine.json")
    assert list(tmp_path.iterdir()) == []


