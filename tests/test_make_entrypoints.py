"""Every script a make target runs starts: `--help` exits 0 from the Makefile's own command line.

The benchmarks and guest checks run for minutes to hours outside `make test`; an import broken by a
refactor (scripts/bench became a package) would otherwise be found only when someone runs them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# `@$(PY) scripts/x.py ARGS`, `@python3 scripts/x.py ARGS`, `@$(PY) -m scripts.x ARGS`
_RECIPE = re.compile(r"^\t@(?:\$\(PY\)|python3) ((?:-m )?scripts[\w./-]*)", re.MULTILINE)


def _entrypoints() -> list[str]:
    return sorted(set(_RECIPE.findall((REPO / "Makefile").read_text())))


def test_makefile_names_the_scripts() -> None:
    entries = _entrypoints()
    # The premise: the pattern still finds the recipes (bench, bench-serve, bench-startup,
    # kernel-matrix, install-check at least).
    assert len(entries) >= 5, entries


@pytest.mark.parametrize("entry", _entrypoints())
def test_script_starts(entry: str) -> None:
    python = REPO / ".venv/bin/python" if (REPO / ".venv/bin/python").exists() else Path(sys.executable)
    cmd = [str(python), *entry.split(), "--help"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr[-2000:]}"
    assert "usage" in r.stdout.lower(), r.stdout[:500]
