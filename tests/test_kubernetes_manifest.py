"""deploy/kubernetes/: valid against the Kubernetes schemas, and the same image, privileges, mounts
and command as the podman recipe (scripts/containers/container_recipe.py), which the README's podman
command and the container tests use too: one table, three places, checked here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.podman import recipe

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "kubernetes" / "accept-watch-daemonset.yaml"


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _daemonset() -> dict[str, Any]:
    (ds,) = [d for d in _docs() if d["kind"] == "DaemonSet"]
    return ds


@pytest.mark.parametrize("version", ["1.28.0", kubernetes_validate.latest_version()])
def test_manifest_validates_against_kubernetes_schemas(version: str) -> None:
    docs = _docs()
    assert {d["kind"] for d in docs} == {"Namespace", "DaemonSet"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any unknown or bad field


def test_schema_validation_catches_mistakes() -> None:
    """The validation is not vacuous: a misspelt field and a wrong type are rejected."""
    ds = _daemonset()
    ds["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)
    ds = _daemonset()
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


def test_manifest_matches_the_podman_recipe() -> None:
    pod = _daemonset()["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == recipe.IMAGE
    assert c.get("imagePullPolicy") == "Never"  # built from Debian packages, never pulled
    assert "command" not in c  # the image's entrypoint, as podman runs it
    assert tuple(c["args"]) == recipe.SERVE_ARGS
    assert pod.get("hostPID", False) == recipe.HOST_PID
    assert pod.get("hostNetwork", False) == recipe.HOST_NETWORK
    assert c["securityContext"].get("privileged", False) == recipe.PRIVILEGED
    assert [p["containerPort"] for p in c["ports"]] == [recipe.METRICS_PORT]
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_mounts = set()
    for m in c["volumeMounts"]:
        vol = volumes[m["name"]]
        if "hostPath" in vol:
            host_mounts.add((vol["hostPath"]["path"], m["mountPath"], m.get("readOnly", False)))
        else:  # only the daemon's config comes from elsewhere
            assert "configMap" in vol and m["mountPath"] == str(Path(recipe.SERVE_ARGS[-1]).parent)
    assert host_mounts == {(m.host, m.container, m.read_only) for m in recipe.MOUNTS}


def test_readme_documents_the_recipe() -> None:
    """The README's podman command is the recipe's, flag for flag."""
    readme = (REPO / "README.md").read_text()
    documented = recipe.podman_run_text("--pid", "4242", "--export", "/out/run.json",
                                        extra_mounts=(("/var/tmp/accept-watch", "/out"),))
    assert " ".join(documented.split()) in " ".join(readme.replace("\\\n", " ").split())
    assert "deploy/kubernetes/accept-watch-daemonset.yaml" in readme
