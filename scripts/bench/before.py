"""The "before" side of a before/after comparison: accept-watch as it was at an earlier commit, run
from a copy of that commit's tree (git archive) with this checkout's virtualenv, so both versions are
measured in the same `make bench` run, on the same machine state, in interleaved rounds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .servers import REPO, VENV_BIN

# The commit issue 14's work started from (performance round 2): `--before REF` picks another.
DEFAULT_REF = "14aa46d"
# Where setuptools' package-dir mapping puts each subpackage (pyproject.toml): the same layout here.
SUBPACKAGES = {"probes": "probes", "daemon": "daemon", "dashboard": "dashboard"}


class BeforeError(Exception):
    """The earlier version could not be prepared (one line)."""


def prepare(ref: str, workdir: Path) -> tuple[list[str], str]:
    """(command prefix that runs that version's accept-watch CLI, the commit it resolved to)."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{ref}^{{commit}}"],
                                capture_output=True, text=True, check=True).stdout.strip()
        tree = workdir / f"before-{commit}"
        tree.mkdir(parents=True)
        # This repository's own history (trusted), unpacked by git and tar.
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, capture_output=True, check=True)
    except subprocess.CalledProcessError as exc:
        raise BeforeError(f"cannot unpack commit {ref!r}: {exc.stderr.strip()[-200:]!r}") from None
    site = tree / "_site"
    pkg = site / "accept_watch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_bytes((tree / "accept_watch" / "__init__.py").read_bytes())
    for name, src in SUBPACKAGES.items():
        (pkg / name).symlink_to(tree / src, target_is_directory=True)
    # sys.path[0] wins over the editable install's finder (appended to sys.meta_path after PathFinder).
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); import accept_watch.daemon.cli as c; "
            f"assert c.__file__.startswith({str(tree)!r}), c.__file__; sys.argv[0] = 'accept-watch'; "
            "sys.exit(c.main())")
    return [str(VENV_BIN / "python"), "-c", code], commit


if __name__ == "__main__":  # a quick check: python -m scripts.bench.before REF DIR -- --version
    prefix, resolved = prepare(sys.argv[1], Path(sys.argv[2]))
    print(resolved, subprocess.run([*prefix, *sys.argv[4:]], check=False).returncode)
