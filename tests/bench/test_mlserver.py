"""The MLServer baseline: a real MLServer on the gateway's own model files."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

import bench.mlserver
from bench.grpc_messages import Bodies
from bench.grpc_runs import probe
from bench.heavy import ensure_heavy
from bench.mlserver import RUNTIMES, baseline, ensure_venv, write_repository
from model_store import ModelStore
from model_store.demo import train_iris
from tests.bench.test_heavy import TINY


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mlserver") / "models"
    ensure_heavy(root, "tiny-lgbm", TINY["lightgbm"], backend="library")
    ensure_heavy(root, "tiny-xgb", TINY["xgboost"], backend="library")
    return root


@pytest.mark.e2e  # the store checks a booster file in a child process
def test_each_model_points_at_the_stores_own_file(root: Path, tmp_path: Path) -> None:
    artifacts = write_repository(tmp_path, root, ["tiny-lgbm", "tiny-xgb"], max_batch_size=64,
                                 max_batch_time_s=0.002)
    store = ModelStore(root)
    for name, family in (("tiny-lgbm", "lightgbm"), ("tiny-xgb", "xgboost")):
        settings = json.loads((tmp_path / name / "model-settings.json").read_text())
        manifest = store.manifest(name, 1)
        assert artifacts[name] == (root / name / "1" / manifest.artifact).resolve()
        assert settings["parameters"]["uri"] == str(artifacts[name])
        assert settings["implementation"] == RUNTIMES[family]
        assert (settings["max_batch_size"], settings["max_batch_time"]) == (64, 0.002)


def test_a_scikit_learn_pickle_gets_the_bench_runtime_once_verified(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.register(train_iris(), "iris", backend="sklearn")
    (artifact,) = write_repository(tmp_path / "repo", store.root, ["iris"]).values()
    settings = json.loads((tmp_path / "repo" / "iris" / "model-settings.json").read_text())
    assert settings["implementation"] == RUNTIMES["sklearn"]
    module = settings["implementation"].rsplit(".", 1)[0]
    assert (tmp_path / "repo" / "iris" / f"{module}.py").read_bytes() == (
        Path(bench.mlserver.__file__).with_name("mlserver_sklearn.py").read_bytes())
    artifact.write_bytes(artifact.read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        write_repository(tmp_path / "again", store.root, ["iris"])


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)  # the first run installs MLServer's virtualenv from its lock
def test_mlserver_answers_a_v2_request_for_each_family(root: Path) -> None:
    rows = np.linspace(-1, 1, 12).reshape(2, 6)
    body = {"inputs": [{"name": "input", "shape": [2, 6], "datatype": "FP64",
                        "data": rows.ravel().tolist()}]}
    store = ModelStore(root)
    with baseline(root, ["tiny-lgbm", "tiny-xgb"]) as svc, svc.client(timeout=30) as client:
        for name in ("tiny-lgbm", "tiny-xgb"):
            answer = client.post(f"/v2/models/{name}/infer", json=body)
            assert answer.status_code == 200, answer.text
            (output,) = answer.json()["outputs"]
            # the probability of class 1, as the gateway's own backend computes it
            expected = np.asarray(store.load_sync(name, 1).predict_proba(rows))[:, 1]
            assert np.allclose(output["data"], expected, atol=1e-6)
    assert svc.proc.returncode is not None  # stopped with the context
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{svc.url}/v2/health/ready", timeout=2)


def test_a_directory_that_is_not_a_virtualenv_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="not a virtualenv"):
        ensure_venv(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)  # the first run installs MLServer's virtualenv from its lock
def test_mlserver_answers_iris_over_grpc(session_store: Path) -> None:
    with baseline(session_store, ["iris"]) as svc:
        for rows in (1, 32):
            body = Bodies("unique", "iris", 4, rows=rows, salt=3)[0]
            assert probe(svc.grpc, body, rows).error is None
