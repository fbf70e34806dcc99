"""The import graph follows the data flow: maps → snapshot → aggregator → document → analysis → views.

Read from the source (ast, imports inside functions included), so a shortcut across the layers fails
here rather than in review: a view reading the maps, the analysis reaching back into the aggregator,
bcc outside probes/, the shipped package importing the demo harness.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("probes", "daemon", "dashboard", "demo")  # installed as accept_watch.<name> (but demo)

# The layers, by module ("package.module").
PROBE_MACHINERY = {  # what touches the kernel: BCC, BTF, the maps, the ring buffer
    "probes.bccimport", "probes.kernel", "probes.btf", "probes.btfformat", "probes.offsets",
    "probes.eventring", "probes.defines", "probes.environment",
}
SNAPSHOT = {"probes.records", "probes.histogram"}  # plain data and maths shared with the kernel side
# The process tree and listening sockets read from /proc: the aggregator's other input, beside the maps.
DISCOVERY = {"daemon.discovery", "daemon.proctree", "daemon.listensockets", "daemon.successors"}
AGGREGATOR = {
    "daemon.stats", "daemon.listenerstate", "daemon.generations", "daemon.rates", "daemon.eventdrain",
}
DOCUMENT = {"daemon.document"}
ANALYSIS = {"daemon.analysis", "daemon.explain", "daemon.figures", "daemon.verdict", "daemon.fairshare"}
RUN_LOOP = {  # the processes' wiring: attach, discover, follow, serve
    "daemon.watch", "daemon.serve", "daemon.cli", "daemon.targets", "daemon.follow", "daemon.resolve",
}
VIEWS = {
    "daemon.terminal", "daemon.report", "daemon.report_html", "daemon.report_charts", "daemon.report_svg",
    "dashboard.app", "dashboard.metrics", "dashboard.metrics_containers", "dashboard.metrics_losses",
    "dashboard.schema", "dashboard.serveapp",
}


def _module_name(path: Path) -> str:
    return f"{path.parent.name}.{path.stem}"


def _imports_of(path: Path) -> set[str]:
    """First-party modules ("daemon.stats") and top-level third-party names ("bcc") a file imports."""
    package = path.parent.name
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within this package
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            base = base.removeprefix("accept_watch.")
            # `from accept_watch.daemon import stats`, `from . import stats`: the names are modules
            names = [f"{base}.{alias.name}" for alias in node.names] if base in PACKAGES else [base]
        else:
            continue
        for name in names:
            name = name.removeprefix("accept_watch.")
            parts = name.split(".")
            out.add(".".join(parts[:2]) if parts[0] in PACKAGES else parts[0])
    return out


@cache
def graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports_of(p) for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def _offenders(modules: set[str] | None, forbidden: set[str]) -> dict[str, list[str]]:
    found = {}
    for mod, imports in graph().items():
        if modules is None or mod in modules:
            bad = sorted((imports & forbidden) - {mod})
            if bad:
                found[mod] = bad
    return found


def test_the_layers_name_real_modules() -> None:
    """A renamed module must be renamed here too, or its rule would silently check nothing."""
    named = PROBE_MACHINERY | SNAPSHOT | DISCOVERY | AGGREGATOR | DOCUMENT | ANALYSIS | RUN_LOOP | VIEWS
    assert named <= set(graph()), sorted(named - set(graph()))
    assert len(graph()) > 60


def test_only_probes_import_bcc() -> None:
    users = {mod for mod, imports in graph().items() if "bcc" in imports}
    assert users == {"probes.bccimport"}, "import bcc through probes/bccimport.py only"


def test_probes_know_nothing_of_their_consumers() -> None:
    probes = {m for m in graph() if m.startswith("probes.")}
    consumers = {m for m in graph() if not m.startswith("probes.")}
    assert _offenders(probes, consumers) == {}


def test_the_document_model_imports_no_layer() -> None:
    assert _offenders(DOCUMENT, set(graph())) == {}


def test_the_aggregator_reads_snapshots_not_maps_and_feeds_forward() -> None:
    forbidden = {"probes.kernel", "probes.bccimport"} | (ANALYSIS - {"daemon.fairshare"}) | VIEWS | RUN_LOOP
    assert _offenders(AGGREGATOR, forbidden) == {}


def test_analysis_works_on_the_document_only() -> None:
    assert _offenders(ANALYSIS, PROBE_MACHINERY | DISCOVERY | AGGREGATOR | RUN_LOOP | VIEWS) == {}


def test_views_only_render() -> None:
    assert _offenders(VIEWS, PROBE_MACHINERY | DISCOVERY | AGGREGATOR | RUN_LOOP) == {}


@pytest.mark.parametrize("package", ["probes", "daemon", "dashboard"])
def test_the_shipped_package_does_not_import_the_demo_harness(package: str) -> None:
    modules = {m for m in graph() if m.startswith(package + ".")}
    assert _offenders(modules, {m for m in graph() if m.startswith("demo.")} | {"demo"}) == {}
