"""One source of truth for running accept-watch in a container.

The podman command in the README, the Kubernetes DaemonSet in deploy/kubernetes/ and the container
tests all come from (or are checked against) this table, so the three cannot drift apart. Each mount
says why it is there; tests/test_containers_image.py shows what fails without the ones it can remove.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

IMAGE = "localhost/accept-watch:0.1.0"
# Debian bookworm userland of the image; the image's Python packages that Debian ships too old
# (fastapi 0.92, uvicorn 0.17, prometheus-client 0.16 against pyproject's minimums) come from PyPI.
SUITE = "bookworm"
IMAGE_DEBS = ("python3", "python3-bpfcc", "python3-psutil", "python3-venv", "iproute2", "ca-certificates")
VENV = "/opt/accept-watch"
ENTRYPOINT = (f"{VENV}/bin/accept-watch",)
# What the DaemonSet runs (the multi-target daemon of branch `serve`); the podman recipe runs the
# same image with a one-server command line instead.
SERVE_ARGS = ("serve", "--config", "/etc/accept-watch/serve.toml")
METRICS_PORT = 9177


@dataclass(frozen=True)
class Mount:
    host: str
    container: str
    read_only: bool
    why: str


MOUNTS = (
    Mount("/lib/modules", "/lib/modules", True,
          "BCC compiles the BPF program at start against /lib/modules/$(uname -r)/build, the host's "
          "kernel headers (struct offsets themselves come from BTF, the headers only need to compile)"),
    Mount("/usr/src", "/usr/src", True,
          "on Debian /lib/modules/$(uname -r)/build and source are symlinks into /usr/src/linux-headers-*: "
          "without it the symlinks dangle"),
)

# Privileges, and why each. --privileged covers CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN (bpf(), perf
# tracepoints, mounting tracefs/debugfs, which accept-watch does itself when /sys/kernel/tracing is
# empty in the container's fresh sysfs) and CAP_SYS_PTRACE (reading workers' /proc/PID/fd and
# memory); --pid=host shows the host's processes (the servers to watch); --net=host puts the
# dashboard and /metrics on the host's network and lets sock_diag list the host's listening sockets
# without entering another namespace.
PRIVILEGED = True
HOST_PID = True
HOST_NETWORK = True


def podman_run_args(*args: str, extra_mounts: tuple[tuple[str, str], ...] = (),
                    mounts: tuple[Mount, ...] = MOUNTS, image: str = IMAGE) -> list[str]:
    """`podman run` for the image; args go to accept-watch. extra_mounts: (host, container) read-write
    (an output directory for --export)."""
    cmd = ["podman", "run", "--rm"]
    if PRIVILEGED:
        cmd.append("--privileged")
    if HOST_PID:
        cmd.append("--pid=host")
    if HOST_NETWORK:
        cmd.append("--net=host")
    for m in mounts:
        cmd += ["-v", f"{m.host}:{m.container}" + (":ro" if m.read_only else "")]
    for host, inside in extra_mounts:
        cmd += ["-v", f"{host}:{inside}"]
    return [*cmd, image, *args]


def podman_run_text(*args: str, extra_mounts: tuple[tuple[str, str], ...] = ()) -> str:
    return shlex.join(podman_run_args(*args, extra_mounts=extra_mounts))
