"""Property test: `report` on a real export mutated field by field never shows a traceback.

tests/data/real_export.json was written by a real accept-watch run counting a real gunicorn (3 workers,
300 connections, counts equal to the app's own per-pid records). Each example changes one to three
places in it (a value replaced by another type, NaN/inf/huge/negative numbers, a key removed or added,
deep nesting) and runs `report`, `report --json` and `report --html` in-process: the only acceptable
outcomes are output with status 0 or exactly one error line with status 2.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accept_watch.daemon.report import run_report

REAL_EXPORT = json.loads((Path(__file__).parent / "data" / "real_export.json").read_text())


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):  # the first few items of each list are enough
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(REAL_EXPORT)[1:]


def _leaf(path: tuple) -> Any:
    v: Any = REAL_EXPORT
    for k in path:
        v = v[k]
    return v


# Numbers are where views compute (scales, logarithms, ns to s): half the mutations aim at them.
# Grouped by field (list indices folded), so that each field is as likely as any other whatever the
# number of workers or histogram buckets.
_NUMBERS: dict[tuple, list[tuple]] = {}
for _p in PATHS:
    if isinstance(_leaf(_p), int | float) and not isinstance(_leaf(_p), bool):
        _NUMBERS.setdefault(tuple("#" if isinstance(k, int) else k for k in _p), []).append(_p)
NUMBER_FIELDS = sorted(_NUMBERS.values())
EXTREME = st.sampled_from([1e308, 1e306, 2**1023, -1e308, 1e300, 2**64, 2**63, -(2**63), -1, -0.5,
                           1e-300, 5e-324, float("nan"), float("inf"), float("-inf"), 0])


def _deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.text(max_size=20), st.just("\x1b]0;pwned\x07\x1b[2J"),
    st.sampled_from([0, -1, -(2**63), 2**64, 10**400 // 10**300, 1e308, -1e308, 5e-324,
                     float("nan"), float("inf"), float("-inf"), 0.5, -0.5]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just([]), st.just({}), st.just([1, 2]), st.just([[0, 1, 2]]), st.just({"x": None}),
    st.sampled_from([10, 30, 100, 900]).map(_deep),
)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(REAL_EXPORT)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(NUMBER_FIELDS).flatmap(st.sampled_from) | st.sampled_from(PATHS))
        parent: Any = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            parent[last]
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "extra"]))
        if action == "replace":
            parent[last] = draw(EXTREME | EXTREME | ODD_VALUES)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(ODD_VALUES)
        else:
            parent.append(draw(ODD_VALUES))
    return doc


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = run_report(argv)
        except SystemExit as exc:  # argparse: cannot happen with these arguments, but say so if it does
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_real_exports_give_output_or_one_line(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.json"
        path.write_text(json.dumps(doc, allow_nan=True))  # NaN/Infinity as Python writes them
        for extra in ([], ["--json"], ["--html", str(Path(tmp) / "out.html")]):
            rc, out, err = _run([str(path), *extra])
            assert "Traceback" not in err
            if rc == 0:
                assert out or extra[:1] == ["--html"]
            else:
                assert rc == 2, (rc, err)
                lines = err.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("accept-watch report: error: "), err
            assert "\x1b]" not in out and "\x07" not in out  # no raw escape sequence reached the terminal


def test_the_real_export_itself_reports() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.json"
        path.write_text(json.dumps(REAL_EXPORT))
        rc, out, err = _run([str(path)])
    assert rc == 0 and "accepts 300" in out, err


def _set(doc: dict[str, Any], path: tuple, value: Any) -> None:
    parent: Any = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value


def test_every_number_field_at_every_extreme() -> None:
    """The exhaustive companion of the property test: each numeric field of the real export (one
    instance per field) set to a huge, infinite, NaN or huge negative value, in all three modes."""
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        path, html = Path(tmp) / "export.json", Path(tmp) / "out.html"
        for group in NUMBER_FIELDS:
            for value in (1e308, float("inf"), float("nan"), -1e308, 2**64):
                doc = copy.deepcopy(REAL_EXPORT)
                _set(doc, group[0], value)
                path.write_text(json.dumps(doc, allow_nan=True))
                for extra in ([], ["--json"], ["--html", str(html)]):
                    try:
                        rc, _out, err = _run([str(path), *extra])
                    except Exception as exc:  # the defect: a traceback instead of a line
                        failures.append((group[0], value, extra[:1], repr(exc)))
                        continue
                    if rc not in (0, 2) or (rc == 2 and len(err.strip().splitlines()) != 1):
                        failures.append((group[0], value, extra[:1], rc, err))
    assert not failures, failures[:5]
