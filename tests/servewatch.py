"""Run the real `accept-watch serve` as a subprocess for kernel tests, and read its HTTP API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests import realservers
from tests.watcher import ACCEPT_WATCH, stop_process, wait_ready


@dataclass
class ServeRun:
    proc: subprocess.Popen[str]
    stderr_path: Path
    web: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as resp:
            return resp.read().decode()

    def targets(self) -> dict[str, dict]:
        return {t["server"]: t for t in json.loads(self.get("/api/targets"))["targets"]}

    def document(self, name: str) -> dict:
        return json.loads(self.get(f"/api/targets/{name}"))

    def samples(self, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every sample called `name` whose labels include `labels`: label set -> value."""
        out = {}
        for family in text_string_to_metric_families(self.get("/metrics")):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out[tuple(sorted(s.labels.items()))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float | None:
        found = list(self.samples(name, **labels).values())
        return found[0] if len(found) == 1 else None

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return stop_process(self.proc, sig, timeout)


def start_serve(tmp: Path, *args: str, web: int, timeout: float = 90) -> ServeRun:
    """Start `accept-watch serve ARGS --listen 127.0.0.1:WEB`; return once it serves."""
    stderr_path = tmp / "serve.stderr"
    cmd = [*ACCEPT_WATCH, "serve", *args, "--listen", f"127.0.0.1:{web}"]
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run = ServeRun(proc, stderr_path, web)
    wait_ready(run, lambda err: "serving /metrics" in err, "serve", timeout)
    return run


def wait_for(cond: Callable[[], object], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s: {what()}")


def start_nginx_at(port: int, workers: int = 2, timeout_s: float = 20.0) -> realservers.Nginx:
    """Debian's nginx (tests/realservers.py's configuration) on a given port, so a restart can come back
    on the same one."""
    workdir = Path(tempfile.mkdtemp(prefix="accept-watch-nginx-"))
    (workdir / "tmp").mkdir()
    conf = workdir / "nginx.conf"
    conf.write_text(realservers._NGINX_CONF.format(workers=workers, dir=workdir, accept_mutex="off",
                                                   listens=f"        listen 127.0.0.1:{port};"))
    proc = realservers._spawn([realservers.NGINX, "-p", str(workdir), "-c", str(conf), "-e",
                               str(workdir / "error.log")], workdir)
    server = realservers.Nginx(proc, workdir, [port], workers)
    try:
        server._wait_ready(workers, timeout_s)
    except BaseException:
        server.close()
        raise
    return server
