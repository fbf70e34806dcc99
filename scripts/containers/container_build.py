"""Build the container images from Debian packages (no registry): `make containers` and the tests.

  localhost/accept-watch-base:<hash>   debootstrapped bookworm + IMAGE_DEBS + a venv in /opt/accept-watch
                                       with the runtime dependencies Debian ships too old (from PyPI)
  localhost/accept-watch:0.1.0         the base + the wheel built from this repository (recipe.IMAGE)
  localhost/accept-watch-testserver:<hash>  debootstrapped bookworm + Debian's python3-gunicorn: the
                                       server-in-a-container of the tests

Roots are keyed by the hash of their recipe (suite, packages, pip requirements, ROOT_RECIPE_VERSION), so a
re-run only rebuilds the wheel layer. podman's storage lives under ~/.cache/accept-watch/containers
(storage.conf written there; CONTAINERS_CONF is this folder's containers.conf), so nothing in /etc is
changed. Run as root. Exit 3: a package could not be fetched (mirror or PyPI unreachable).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import container_recipe as recipe  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "accept-watch" / "containers"


def apt_mirror() -> str:
    """The Debian mirror apt uses here (deb822 .sources or a one-line sources.list entry)."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read(65536))
        except OSError:
            continue
    for text in texts:
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            urls = words[1:] if words[:1] == ["URIs:"] else words[1:2] if words[:1] == ["deb"] else []
            for url in urls:
                if url.startswith(("http://", "https://")) and url.rstrip("/").endswith("/debian"):
                    return url.rstrip("/")
    return "http://deb.debian.org/debian"


MIRROR = os.environ.get("AW_DEBIAN_MIRROR") or apt_mirror()
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
BASE = "localhost/accept-watch-base"
TESTSERVER = "localhost/accept-watch-testserver"
TESTSERVER_DEBS = ("python3-gunicorn",)


class FetchError(Exception):
    """A package could not be fetched: not a bug of the build."""


def say(msg: str) -> None:
    print(f"containers: {msg}", file=sys.stderr, flush=True)


def podman_env() -> dict[str, str]:
    """The environment podman runs with: the project's containers.conf and storage under the cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    storage = CACHE / "storage.conf"
    text = (f'[storage]\ndriver = "overlay"\ngraphroot = "{CACHE / "storage"}"\n'
            f'runroot = "/run/accept-watch-containers"\n')
    if not storage.exists() or storage.read_text() != text:
        storage.write_text(text)
    return {**os.environ, "CONTAINERS_CONF": str(HERE / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(storage)}


def podman(*args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=podman_env(), check=check, text=True, **kw)  # type: ignore[call-overload]


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def runtime_requirements() -> list[str]:
    """pyproject's runtime dependencies that the image takes from PyPI (psutil comes from Debian)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not d.startswith("psutil")]


# Bump when the way a root is built changes (debootstrap options, _slim, _venv): the cache key.
ROOT_RECIPE_VERSION = 1


def _key(*parts: object) -> str:
    blob = json.dumps([ROOT_RECIPE_VERSION, recipe.SUITE, MIRROR, *parts], default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_tag() -> str:
    return f"{BASE}:{_key(recipe.IMAGE_DEBS, runtime_requirements(), recipe.VENV)}"


def testserver_tag() -> str:
    return f"{TESTSERVER}:{_key(TESTSERVER_DEBS)}"


def _chroot(root: Path, *cmd: str) -> None:
    subprocess.run(["chroot", str(root), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME=/root", "LC_ALL=C.UTF-8", *cmd], check=True)


def debootstrap(root: Path, debs: tuple[str, ...]) -> None:
    say(f"debootstrap {recipe.SUITE} minbase + {' '.join(debs)} (from {MIRROR})")
    log = root.parent / "debootstrap.log"
    with open(log, "w") as out:
        rc = subprocess.run(["nice", "-n", "10", "debootstrap", "--variant=minbase", f"--keyring={KEYRING}",
                             f"--include={','.join(debs)}", recipe.SUITE, str(root), MIRROR],
                            stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text().splitlines()[-5:]
        raise FetchError("debootstrap failed: " + " | ".join(tail))


def _slim(root: Path) -> None:
    """What an image does not need: apt's downloaded lists and packages, docs, the host's resolv.conf."""
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                "usr/share/locale", "root/.cache"):
        p = root / sub
        if p.is_dir():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name not in ("lock", "partial"):
                    child.unlink()
    (root / "etc/resolv.conf").unlink(missing_ok=True)


def _import(root: Path, tag: str, changes: list[str]) -> None:
    say(f"podman import -> {tag}")
    tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    args = ["import"]
    for c in changes:
        args += ["--change", c]
    proc = subprocess.run(["podman", *args, "-", tag], stdin=tar.stdout, env=podman_env(),
                          stdout=subprocess.DEVNULL, check=False)
    tar.wait()
    if tar.returncode or proc.returncode:
        raise RuntimeError(f"podman import of {tag} failed (tar {tar.returncode}, podman {proc.returncode})")


def _drop_stale(tag: str) -> None:
    """Remove the repository's other tags (roots of older recipes): the cache stays one root each."""
    repo = tag.rsplit(":", 1)[0]
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", repo, capture_output=True, check=False)
    stale = [t for t in listed.stdout.split() if t != tag and t.startswith(repo + ":")]
    if stale:
        podman("rmi", *stale, check=False, capture_output=True)


def _build_root(tag: str, debs: tuple[str, ...], post: object = None) -> None:
    _drop_stale(tag)
    with tempfile.TemporaryDirectory(prefix="aw-root-", dir=CACHE) as tmp:
        root = Path(tmp) / "root"
        debootstrap(root, debs)
        if callable(post):
            post(root)
        _slim(root)
        _import(root, tag, ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])


def _venv(root: Path) -> None:
    """The venv sees Debian's site-packages (bcc, psutil); pip adds what Debian has too old."""
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    say(f"venv {recipe.VENV} + {' '.join(runtime_requirements())} (PyPI)")
    _chroot(root, "python3", "-m", "venv", "--system-site-packages", recipe.VENV)
    # The host's CA bundle for this one step (the build host may reach PyPI through a TLS proxy whose
    # CA only the host trusts); it is removed again, the image keeps Debian's own bundle.
    host_ca = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    ca = root / "tmp/build-host-ca.crt"
    cert = ["--cert", "/tmp/build-host-ca.crt"] if host_ca.is_file() else []
    if cert:
        shutil.copy(host_ca, ca)
    try:
        _chroot(root, f"{recipe.VENV}/bin/pip", "install", "-q", "--no-cache-dir",
                "--disable-pip-version-check", *cert, *runtime_requirements())
    except subprocess.CalledProcessError as exc:
        raise FetchError(f"pip install in the image failed ({exc.returncode})") from None
    finally:
        ca.unlink(missing_ok=True)


def ensure_base() -> str:
    tag = base_tag()
    if image_exists(tag):
        return tag
    _build_root(tag, recipe.IMAGE_DEBS, _venv)
    return tag


def ensure_testserver() -> str:
    tag = testserver_tag()
    if not image_exists(tag):
        _build_root(tag, TESTSERVER_DEBS)
    return tag


def tree_files() -> list[str]:
    """The working tree's files, tracked and new, not ignored."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                         capture_output=True, check=True).stdout.decode()
    return sorted(n for n in out.split("\0") if n and (REPO / n).is_file())


def tree_hash() -> str:
    h = hashlib.sha256()
    for name in tree_files():
        h.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_wheel(out: Path) -> Path:
    say("building the wheel")
    # From a copy of the working tree's files: setuptools' build/ in the repository can hold modules
    # deleted since, and would put them in the wheel.
    src = out / "src"
    for name in tree_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"pip wheel failed: {proc.stderr.strip()[-2000:]}")
    wheels = sorted(out.glob("accept_watch-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one accept_watch wheel in {out}, found {len(wheels)}")
    return wheels[0]


def ensure_image() -> str:
    """The accept-watch image from the current tree: rebuilt (the wheel layer only; the base is cached)
    unless the image already carries this tree's hash on this base."""
    base = ensure_base()
    source = f"{base}@{tree_hash()}"
    current = podman("image", "inspect", "--format", '{{index .Labels "accept-watch.source"}}', recipe.IMAGE,
                     check=False, capture_output=True)
    if current.returncode == 0 and current.stdout.strip() == source:
        return recipe.IMAGE
    with tempfile.TemporaryDirectory(prefix="aw-ctx-") as tmp:
        ctx = Path(tmp)
        wheel = build_wheel(ctx)
        (ctx / "Containerfile").write_text(
            f"FROM {base}\n"
            f"COPY {wheel.name} /tmp/\n"
            f"RUN {recipe.VENV}/bin/pip install -q --no-deps --no-index /tmp/{wheel.name}"
            f" && rm /tmp/{wheel.name}\n"
            f"ENTRYPOINT {json.dumps(list(recipe.ENTRYPOINT))}\n"
            f"LABEL accept-watch.source={json.dumps(source)}\n")
        say(f"podman build -> {recipe.IMAGE}")
        podman("build", "-q", "--network=none", "-t", recipe.IMAGE, str(ctx), stdout=subprocess.DEVNULL)
    # The previous build's image, untagged now: drop it (and only dangling images) so rebuilds do not pile up.
    podman("image", "prune", "-f", check=False, capture_output=True)
    return recipe.IMAGE


def main() -> int:
    argparse.ArgumentParser(
        description="Build (or find cached) the accept-watch container image and the test-server image "
                    "from Debian packages; exit 3 if the packages cannot be fetched.",
    ).parse_args()
    if os.geteuid() != 0:
        print("containers: error: run as root (debootstrap, chroot, podman)", file=sys.stderr)
        return 1
    for tool in ("podman", "debootstrap", "runc"):
        if not shutil.which(tool):
            print(f"containers: error: {tool} not found (make setup installs it)", file=sys.stderr)
            return 1
    start = time.monotonic()
    try:
        image = ensure_image()
        server = ensure_testserver()
    except FetchError as exc:
        print(f"containers: FETCH FAILED: {exc}", file=sys.stderr)
        return 3
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        print(f"containers: error: {exc}", file=sys.stderr)
        return 1
    say(f"ready in {time.monotonic() - start:.0f}s: {image}, {server}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
