"""Bad input: one line on stderr, non-zero exit, no traceback, nothing left attached."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import servers
from tests.watcher import (
    bpf_program_ids_of,
    loaded_bpf_program_ids,
    run_cli,
    start_watch,
)


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _free_pid() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_missing_pid_is_one_line() -> None:
    pid = _free_pid()
    _one_line_error(run_cli("--pid", str(pid)), f"no process with pid {pid}")


def test_bad_arguments_are_one_line() -> None:
    _one_line_error(run_cli("--pid", "abc"), "not a process id")
    _one_line_error(run_cli("--pid", "1", "--duration", "-3"), "must be a number > 0")
    _one_line_error(run_cli("--pid", "1", "--listen", "nowhere"), "HOST:PORT")
    _one_line_error(run_cli("--pid", "1", "--events-sample", "0"), "whole number from 1")
    _one_line_error(run_cli("--pid", "1", "--events-sample", "10"), "--events-sample needs --events")


def test_export_path_that_cannot_be_written(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "out.json"
    _one_line_error(run_cli("--pid", str(os.getpid()), "--export", str(target)), str(target))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(run_cli("--pid", str(os.getpid()), "--events", str(blocker / "e.ndjson")), "e.ndjson")


def test_help_has_examples() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and "--pid" in proc.stdout and "doctor" in proc.stdout


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel_ok")
def test_pid_without_listening_socket() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _one_line_error(run_cli("--pid", str(sleeper.pid)), f"pid {sleeper.pid}", "no listening TCP socket")
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel_ok")
def test_not_root_names_the_capabilities() -> None:
    with servers.start_gunicorn(workers=1) as srv:
        proc = run_cli("--pid", str(srv.master_pid), user="65534")
    _one_line_error(proc, "CAP_BPF", "CAP_PERFMON")


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel_ok")
def test_no_btf_is_one_line(tmp_path: Path) -> None:
    with servers.start_gunicorn(workers=1) as srv:
        env_btf = tmp_path / "missing-vmlinux"
        proc = subprocess.run(
            [sys.executable, "-m", "accept_watch.daemon.cli", "--pid", str(srv.master_pid)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "ACCEPT_WATCH_BTF": str(env_btf)},
        )
    _one_line_error(proc, "BTF")


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel_ok")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_detaches_flushes_and_exits_zero(tmp_path: Path, sig: str) -> None:
    import signal

    with servers.start_gunicorn(workers=2) as srv:
        run = start_watch(srv.master_pid, tmp_path)
        # This run's own programs (other accept-watch runs on a shared machine load same-named ones).
        mine = bpf_program_ids_of(run.proc.pid)
        assert mine, "the probes should be loaded while watching"
        result = servers.run_clients(srv.port, 10, concurrency=1)
        assert result.failed == 0
        assert run.stop(getattr(signal, sig)) == 0, run.stderr()
    assert run.document()["total_accepts"] == 10
    assert run.document()["ended_at"] is not None
    deadline = time.monotonic() + 5
    while loaded_bpf_program_ids() & mine and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not loaded_bpf_program_ids() & mine, "programs left loaded after exit"


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel_ok")
def test_dry_run_and_print_bpf() -> None:
    with servers.start_gunicorn(workers=1) as srv:
        dry = run_cli("--pid", str(srv.master_pid), "--dry-run")
        printed = run_cli("--pid", str(srv.master_pid), "--print-bpf")
    assert dry.returncode == 0, dry.stderr
    assert "dry run OK: probe" in dry.stdout
    assert printed.returncode == 0, printed.stderr
    assert "#define OFF_TASK_FILES" in printed.stdout and "TRACEPOINT_PROBE(syscalls" in printed.stdout
