"""php-fpm behind nginx (fastcgi_pass over loopback TCP), for the real-server tests.

Debian's php-fpm with its own config in a temp dir, in the foreground (the process started is the pool
master). nginx in front turns each HTTP request into one FastCGI connection to php-fpm's port (no
fastcgi keep-alive), so every request is one accept by a php-fpm child. Ground truth is the PHP script's
own record of each request, "<child pid> <hrtime ns> <php-fpm port>": PHP's hrtime() reads
CLOCK_MONOTONIC, the clock of accept-watch's timestamps. `pm` is "static" (max_children forked at start)
or "dynamic" (start_servers at start, more forked under load up to max_children). Only processes started
here are signalled.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.groundtruth import LogRecord
from tests.realservers import (
    NGINX,
    LogServer,
    _spawn,
    children,
    idle,
    listening_ports,
    pid_time_port_records,
    wait_until,
)
from tests.watcher import free_port


def php_fpm_binary() -> str | None:
    found = sorted(glob.glob("/usr/sbin/php-fpm*"))
    return found[-1] if found else None


_FPM_CONF = """\
[global]
pid = {dir}/fpm.pid
error_log = {dir}/fpm-error.log
daemonize = no
[pool]
user = www-data
group = www-data
listen = 127.0.0.1:{port}
listen.backlog = 511
pm = {pm}
pm.max_children = {workers}
pm.start_servers = {start}
pm.min_spare_servers = 1
pm.max_spare_servers = {workers}
clear_env = no
"""

_PHP = """<?php
$sleep = (int) getenv("AW_SLEEP_US");
if ($sleep > 0) { usleep($sleep); }
$line = getmypid() . " " . hrtime(true) . " " . $_SERVER["SERVER_PORT"] . "\\n";
file_put_contents(getenv("AW_RECORD"), $line, FILE_APPEND);
echo "ok\\n";
"""

_NGINX_FRONT = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    keepalive_timeout 0;
    client_body_temp_path {dir}/tmp/body;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    server {{
        listen 127.0.0.1:{http_port};
        location / {{
            fastcgi_pass 127.0.0.1:{fpm_port};
            fastcgi_param SCRIPT_FILENAME {dir}/www/index.php;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param SERVER_PORT {fpm_port};
        }}
    }}
}}
"""


class PhpFpm(LogServer):
    """The php-fpm pool master and its children; `http_port` is nginx's, where load is sent."""

    name = "php-fpm"

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, ports: list[int], front: LogServer,
                 http_port: int, pm: str) -> None:
        super().__init__(proc, workdir, ports)
        self.front = front
        self.http_port = http_port
        self.pm = pm

    def log_records(self) -> list[LogRecord]:
        return pid_time_port_records(self.workdir / "records.log", "php-fpm record", 1e9)

    def stop(self, timeout_s: float = 10.0) -> None:
        try:
            self.front.stop(timeout_s)
        finally:
            super().stop(timeout_s)

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self.front.workdir, ignore_errors=True)


def start_php_fpm(workers: int = 4, pm: str = "static", start: int | None = None, sleep_ms: float = 0,
                  timeout_s: float = 20.0) -> PhpFpm:
    """sleep_ms: each request sleeps this long first (so that load makes a dynamic pool grow)."""
    binary = php_fpm_binary()
    if binary is None:
        raise RuntimeError("php-fpm is not installed (scripts/setup.sh installs Debian's php-fpm)")
    if pm not in ("static", "dynamic"):
        raise ValueError(f"unknown php-fpm pm {pm!r}")
    start = workers if start is None else start
    for _ in range(3):
        fpm_port, http_port = free_port(), free_port()
        if fpm_port == http_port:
            continue
        workdir = Path(tempfile.mkdtemp(prefix="accept-watch-php-fpm-"))
        workdir.chmod(0o755)
        (workdir / "tmp").mkdir()
        (workdir / "www").mkdir()
        (workdir / "www" / "index.php").write_text(_PHP)
        record = workdir / "records.log"
        record.touch()
        record.chmod(0o666)  # children run as www-data
        (workdir / "fpm.conf").write_text(_FPM_CONF.format(dir=workdir, port=fpm_port, pm=pm, workers=workers,
                                                           start=start))
        (workdir / "nginx.conf").write_text(_NGINX_FRONT.format(dir=workdir, http_port=http_port,
                                                                fpm_port=fpm_port))
        env = {**os.environ, "AW_RECORD": str(record), "AW_SLEEP_US": str(int(sleep_ms * 1000))}
        proc = _spawn([binary, "--nodaemonize", "--fpm-config", str(workdir / "fpm.conf")], workdir, env=env)
        front_proc = _spawn([NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e",
                             str(workdir / "nginx-error.log")], workdir)
        front = LogServer(front_proc, Path(tempfile.mkdtemp(prefix="accept-watch-fpm-front-")), [http_port])
        server = PhpFpm(proc, workdir, [fpm_port], front, http_port, pm)

        def ready(server: PhpFpm = server, fpm_port: int = fpm_port, http_port: int = http_port) -> bool:
            for p in (server.proc, server.front.proc):
                if p.poll() is not None:
                    raise RuntimeError(f"php-fpm or its nginx exited during start-up: {server.tail()}")
            kids = children(server.master_pid)
            return (len(kids) == start and idle(kids) and fpm_port in listening_ports(server.master_pid)
                    and http_port in listening_ports(server.front.master_pid))

        try:
            wait_until(ready, timeout_s, lambda server=server: f"php-fpm: {server.tail()}")
            return server
        except (RuntimeError, TimeoutError) as exc:
            server.close()
            if "in use" not in str(exc) and "Address already" not in str(exc):
                raise
    raise RuntimeError("php-fpm: no free ports after 3 tries")


__all__ = ["PhpFpm", "php_fpm_binary", "start_php_fpm"]
