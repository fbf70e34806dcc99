"""daemon/procident.py: pid inside the container and container identity, from /proc texts (pure
parsing; the real podman case is in tests/test_containers.py)."""

from __future__ import annotations

import os

import pytest

from accept_watch.daemon import procident
from accept_watch.daemon.document import Container

ID = "fa9d18bbc328d8f219d49cf36b3635775fd34580c28c913e3e9eed97b849a06d"
UID = "0f3c4f52-1c5e-4e0a-9f6b-3a1d2c4b5e6f"


def test_nspid_is_the_innermost_pid() -> None:
    assert procident.parse_nspid("Name:\tgunicorn\nNSpid:\t13909\t7\nNSpgid:\t1\n") == 7
    assert procident.parse_nspid("NSpid:\t4242\n") == 4242
    assert procident.parse_nspid("NSpid:\t4242\t12\t3\n") == 3  # nested namespaces: the last one
    assert procident.parse_nspid("Name:\tx\n") is None  # kernels before 4.1
    assert procident.parse_nspid("NSpid:\t\n") is None


HYBRID_PODMAN = "\n".join(
    [f"{n}:{c}:/libpod_parent/libpod-{ID}" for n, c in ((9, "name=systemd"), (4, "memory"), (1, "cpu"))]
    + [f"0::/libpod_parent/libpod-{ID}"])


@pytest.mark.parametrize(("cgroup", "runtime", "pod"), [
    (HYBRID_PODMAN, "podman", None),
    (f"0::/machine.slice/libpod-{ID}.scope/container", "podman", None),
    (f"0::/system.slice/docker-{ID}.scope", "docker", None),
    (f"12:pids:/docker/{ID}\n0::/", "docker", None),
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
     f"cri-containerd-{ID}.scope", "containerd", UID),
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
     f"crio-{ID}.scope", "cri-o", UID),
    (f"0::/kubepods/besteffort/pod{UID}/{ID}", "kubernetes", UID),
])
def test_container_runtimes(cgroup: str, runtime: str, pod: str | None) -> None:
    path = procident.cgroup_path(cgroup)
    assert path is not None
    found = procident.parse_container(path)
    assert found is not None and (found["id"], found["runtime"], found.get("pod")) == (ID, runtime, pod)
    assert found["cgroup"] == path
    Container.model_validate(found)


@pytest.mark.parametrize("cgroup", [
    "0::/", "0::/user.slice/user-0.slice/session-1.scope", "4:memory:/process_api/062c8a6495e5d34489bd8d5e",
    f"0::/machine.slice/libpod-conmon-{ID}.scope",  # podman's monitor, not the container
    f"0::/system.slice/crio-conmon-{ID}.scope",
    "0::/system.slice/docker-notahexid.scope", f"0::/x/{ID}",  # a bare id under no runtime's parent
    f"0::/system.slice/docker-{ID}x.scope",
])
def test_not_a_container(cgroup: str) -> None:
    path = procident.cgroup_path(cgroup)
    assert path is None or procident.parse_container(path) is None


def test_v2_root_falls_back_to_v1_systemd_first() -> None:
    text = "4:memory:/a\n9:name=systemd:/b\n0::/\n"
    assert procident.cgroup_path(text) == "/b"
    assert procident.cgroup_path("0::/c\n4:memory:/a\n") == "/c"
    assert procident.cgroup_path("garbage\n") is None


def test_untrusted_paths_are_sanitized_and_bounded() -> None:
    hostile = f"/evil\x1b[2J\n\u202e{'x' * 600}/libpod-{ID}.scope"
    found = procident.parse_container(hostile)
    assert found is not None and found["id"] == ID
    cg = found["cgroup"]
    assert len(cg) <= procident.MAX_PATH and cg.startswith("...") and cg.endswith(f"libpod-{ID}.scope")
    assert all(c.isascii() and c.isprintable() for c in cg)
    short = procident.safe_path("/a\x1b[31mb\tc")
    assert short == "/a??31mb?c"
    Container.model_validate(found)


def test_host_process_has_no_identity() -> None:
    """This test process runs on the host (CI and dev VMs), in no container: nothing to add."""
    assert "nspid" not in procident.identity(os.getpid())
    assert procident.identity(0x7FFFFFFF) == {}  # no such process
