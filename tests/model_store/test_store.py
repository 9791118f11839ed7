from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from model_store import ArtifactRejected, ModelNotFound, ModelStore
from model_store.__main__ import main as cli
from model_store.demo import IRIS_FEATURES, iris_data

pytestmark = pytest.mark.anyio


def test_round_trip_keeps_predictions_and_manifest(tmp_path: Path, iris_estimator) -> None:
    store = ModelStore(tmp_path)
    m = store.register(iris_estimator, "iris", features=IRIS_FEATURES)
    assert (m.name, m.version, m.features) == ("iris", 1, IRIS_FEATURES)
    assert m.classes == ("setosa", "versicolor", "virginica")
    assert m.task == "classification"
    assert set(m.library_versions) == {"python", "sklearn", "joblib", "numpy"}
    manifest = json.loads((tmp_path / "iris" / "1" / "model.json").read_text())
    assert manifest["sha256"] == m.sha256 and manifest["features"] == list(IRIS_FEATURES)

    loaded = store.load_sync("iris", 1)
    x, _ = iris_data()
    assert loaded.predict(x) == iris_estimator.predict(x).tolist()


def test_versions_and_latest(tmp_path: Path, iris_estimator) -> None:
    store = ModelStore(tmp_path)
    assert store.models() == {}
    store.register(iris_estimator, "iris")
    store.register(iris_estimator, "iris", version=5)
    assert store.register(iris_estimator, "iris").version == 6
    assert store.models() == {"iris": [1, 5, 6]}
    assert store.latest("iris") == 6
    assert store.resolve("iris", "latest") == 6 and store.resolve("iris", "5") == 5
    with pytest.raises(ModelNotFound):
        store.resolve("iris", 2)
    with pytest.raises(ModelNotFound):
        store.latest("nope")
    with pytest.raises(ValueError, match="already has version 5"):
        store.register(iris_estimator, "iris", version=5)
    with pytest.raises(ValueError, match="positive"):
        store.register(iris_estimator, "iris", version=0)


def test_tampered_artifact_is_refused_before_unpickling(tmp_path: Path, iris_estimator) -> None:
    unpickled: list[Path] = []
    store = ModelStore(tmp_path, loader=lambda p: unpickled.append(p))
    ModelStore(tmp_path).register(iris_estimator, "iris")
    artifact = tmp_path / "iris" / "1" / "model.joblib"
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    with pytest.raises(ArtifactRejected, match=r"model\.joblib: sha256 mismatch"):
        store.load_sync("iris", 1)
    assert unpickled == []


def test_missing_manifest_is_refused(tmp_path: Path, iris_estimator) -> None:
    store = ModelStore(tmp_path)
    store.register(iris_estimator, "iris")
    (tmp_path / "iris" / "1" / "model.json").unlink()
    with pytest.raises(ArtifactRejected, match=r"model\.json: manifest missing"):
        store.load_sync("iris", 1)


def test_feature_count_mismatch_is_refused(tmp_path: Path, iris_estimator) -> None:
    store = ModelStore(tmp_path)
    store.register(iris_estimator, "iris")
    path = tmp_path / "iris" / "1" / "model.json"
    manifest = json.loads(path.read_text())
    manifest["features"] = manifest["features"][:3]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactRejected, match="expects 4 features, manifest lists 3"):
        store.load_sync("iris", 1)


def test_regression_model_has_no_classes(tmp_path: Path) -> None:
    from sklearn.linear_model import LinearRegression

    x, _ = iris_data()
    m = ModelStore(tmp_path).register(LinearRegression().fit(x[:, :3], x[:, 3]), "petal")
    assert m.task == "regression" and m.classes == () and m.features == ("f0", "f1", "f2")


async def test_concurrent_loads_of_one_version_load_once(tmp_path: Path, iris_estimator) -> None:
    ModelStore(tmp_path).register(iris_estimator, "iris")
    loads: list[Path] = []

    def loader(path: Path) -> object:
        loads.append(path)
        return iris_estimator

    store = ModelStore(tmp_path, loader=loader)
    models = await asyncio.gather(*(store.load("iris", 1) for _ in range(20)))
    assert len(loads) == 1
    assert all(m is models[0] for m in models)


def test_cli_train_register_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import joblib

    root = tmp_path / "store"
    assert cli(["--root", str(root), "train-demo"]) == 0
    assert cli(["--root", str(root), "train-demo", "--if-empty"]) == 0
    assert ModelStore(root).models() == {"iris": [1]}
    x, y = iris_data()
    pkl = tmp_path / "lr.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), pkl)
    assert cli(["--root", str(root), "register", str(pkl), "--name", "lr",
                "--features", ",".join(IRIS_FEATURES)]) == 0
    assert cli(["--root", str(root), "register", str(pkl), "--name", "lr", "--version", "1"]) == 1
    capsys.readouterr()
    assert cli(["--root", str(root), "list"]) == 0
    out = capsys.readouterr().out
    assert "iris\tv1\tclassification" in out and "lr\tv1" in out
    loaded = ModelStore(root).load_sync("iris", 1)
    assert loaded.predict(np.array([[5.1, 3.5, 1.4, 0.2]])) == ["setosa"]
