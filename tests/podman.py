"""Real podman for the container tests: the images of scripts/containers (built once, cached under
~/.cache/accept-watch/containers), a gunicorn inside a container, the accept-watch image run as the
README documents."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts" / "containers"))
import container_build as build  # noqa: E402
import container_recipe as recipe  # noqa: E402

__all__ = ["InContainer", "build", "podman_unavailable_reason", "recipe", "start_gunicorn_in_container"]

# post_worker_init records each worker as it sees itself (its pid inside the container).
_READY_HOOK = """\
import os

def post_worker_init(worker):
    path = os.path.join("/ready", str(os.getpid()))
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {os.getppid()}\\n")
    os.replace(path + ".tmp", path)
"""


def podman_unavailable_reason() -> str | None:
    import os

    if os.geteuid() != 0:
        return "podman tests run as root"
    for tool in ("podman", "runc", "debootstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (make setup)"
    return None


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], env=build.podman_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode:
        what = " ".join(args[:3])
        raise AssertionError(f"podman {what} ... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


@dataclass
class InContainer:
    """A gunicorn (Debian's python3-gunicorn, the pid app) running in a podman container."""

    name: str
    container_id: str
    host_master_pid: int
    port: int
    record_dir: Path
    ready_dir: Path

    def stop(self) -> None:
        podman("rm", "-f", "-t", "5", self.name, check=False)

    def logs(self) -> str:
        return podman("logs", self.name, check=False).stderr[-3000:]


def start_gunicorn_in_container(image: str, tmp: Path, workers: int = 4, host_ns: bool = False,
                                timeout: float = 60) -> InContainer:
    """In the container's own pid and network namespaces (port 8000 inside, published on a loopback
    port podman picks), or with host_ns in the host's (port 0: gunicorn's log says which it got)."""
    record_dir, ready_dir, conf = tmp / "records", tmp / "ready", tmp / "conf"
    for d in (record_dir, ready_dir, conf):
        d.mkdir(parents=True)
    (conf / "gunicorn.conf.py").write_text(_READY_HOOK)
    name = f"aw-test-{uuid.uuid4().hex[:12]}"
    args = ["run", "-d", "--name", name,
            "-v", f"{REPO / 'tests' / 'apps'}:/app:ro", "-v", f"{record_dir}:/records",
            "-v", f"{ready_dir}:/ready", "-v", f"{conf}:/conf:ro", "-e", "PIDAPP_RECORD_DIR=/records",
            # pidapp is the demo app plus its record hook: the demo package goes in beside it.
            "-v", f"{REPO / 'demo'}:/pkgs/demo:ro", "-e", "PYTHONPATH=/pkgs"]
    args += ["--pid=host", "--net=host"] if host_ns else ["-p", "127.0.0.1::8000"]
    bind = "127.0.0.1:0" if host_ns else "0.0.0.0:8000"
    # Debian's python3-gunicorn has the module; the `gunicorn` script is in the separate gunicorn package.
    args += [image, "python3", "-m", "gunicorn", "-w", str(workers), "-b", bind,
             "-c", "/conf/gunicorn.conf.py", "--chdir", "/app", "pidapp:app"]
    cid = podman(*args).stdout.strip()
    srv = InContainer(name, cid, 0, 0, record_dir, ready_dir)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"Listening at: http://[0-9.]+:(\d+)", srv.logs())
            booted = [p for p in ready_dir.iterdir() if not p.name.endswith(".tmp")]
            if m and len(booted) == workers:
                published = "" if host_ns else podman("port", name, "8000").stdout.strip()
                srv.port = int(published.rsplit(":", 1)[1]) if published else int(m.group(1))
                break
            state = podman("inspect", "-f", "{{.State.Status}}", name, check=False).stdout.strip()
            if state not in ("running", "created", "configured"):
                raise AssertionError(f"container {name} is {state}: {srv.logs()}")
            time.sleep(0.2)
        else:
            raise AssertionError(f"gunicorn in {name} not ready within {timeout}s: {srv.logs()}")
        srv.host_master_pid = int(podman("inspect", "-f", "{{.State.Pid}}", name).stdout.strip())
    except BaseException:
        srv.stop()
        raise
    return srv
