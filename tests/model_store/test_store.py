from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model_store import ArtifactRejected, ModelNotFound, ModelSettings, ModelStore
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


def test_errors_name_model_version_and_reason_but_no_path(tmp_path: Path,
                                                          iris_estimator) -> None:
    store = ModelStore(tmp_path)
    store.register(iris_estimator, "iris")
    store.register(iris_estimator, "iris")
    (tmp_path / "iris" / "1" / "model.joblib").write_bytes(b"tampered")
    (tmp_path / "iris" / "2" / "model.joblib").unlink()
    messages = []
    for version in (1, 2, 3):
        with pytest.raises((ArtifactRejected, ModelNotFound)) as info:
            store.load_sync("iris", version)
        messages.append(str(info.value))
    with pytest.raises(ModelNotFound) as info:
        store.latest("nope")
    messages.append(str(info.value))
    assert messages[0].startswith("model 'iris' v1: model.joblib: sha256 mismatch")
    assert messages[1] == "model 'iris' v2: artifact model.joblib missing"
    assert messages[2] == "model 'iris' has no version 3"
    assert messages[3] == "model 'nope' not found"
    assert not any(str(tmp_path) in m or "/" in m for m in messages)


class _NoPredict:
    n_features_in_ = 4


@pytest.mark.parametrize(("unpickled", "reason"), [
    (42, "holds an object of type int, not an estimator"),
    (_NoPredict(), "holds an object of type _NoPredict, not an estimator"),
    (LogisticRegression(max_iter=1000).fit(iris_data()[0][:, :3], iris_data()[1]),
     "expects 3 features, manifest lists 4"),
])
def test_what_is_not_an_estimator_of_the_manifest_is_refused_at_load(
        tmp_path: Path, iris_estimator, unpickled: object, reason: str) -> None:
    ModelStore(tmp_path).register(iris_estimator, "iris")
    store = ModelStore(tmp_path, loader=lambda _p: unpickled)
    with pytest.raises(ArtifactRejected, match=reason):
        store.load_sync("iris", 1)


def test_an_artifact_that_cannot_be_unpickled_is_refused(tmp_path: Path,
                                                         iris_estimator) -> None:
    import pickle

    def loader(_path: Path) -> object:
        raise pickle.UnpicklingError("invalid load key, 'h'.")

    ModelStore(tmp_path).register(iris_estimator, "iris")
    with pytest.raises(ArtifactRejected, match=r"model 'iris' v1: model\.joblib cannot be "
                                               r"unpickled: UnpicklingError: invalid load key"):
        ModelStore(tmp_path, loader=loader).load_sync("iris", 1)


def test_scan_reports_added_removed_and_changed_versions(tmp_path: Path,
                                                         iris_estimator) -> None:
    import shutil

    unpickled: list[Path] = []
    store = ModelStore(tmp_path, loader=lambda p: unpickled.append(p))
    assert store.scan() == {}
    store.register(iris_estimator, "iris", backend="sklearn")
    store.register(iris_estimator, "iris", backend="sklearn")
    first = store.scan()
    assert set(first) == {"iris"} and set(first["iris"]) == {1, 2}
    assert store.scan() == first and not store.changes(first, store.scan())

    store.register(iris_estimator, "other", backend="sklearn")
    store.configure("iris", 2, {"max_batch_size": 8})
    shutil.rmtree(tmp_path / "iris" / "1")
    (tmp_path / "iris" / ".5-partial").mkdir()  # a version being written is not a version
    second = store.scan()
    changes = store.changes(first, second)
    assert changes.added == [("other", 1)]
    assert changes.removed == [("iris", 1)]
    assert changes.changed == [("iris", 2)]
    (tmp_path / "other" / "1" / "model.json").unlink()
    assert store.scan()["other"] == {1: ""}
    assert unpickled == []  # scanning never unpickles


def test_settings_are_stored_in_the_manifest(tmp_path: Path, iris_estimator) -> None:
    store = ModelStore(tmp_path)
    m = store.register(iris_estimator, "iris", backend="sklearn",
                       settings={"max_batch_size": 8, "execution": "inline"})
    assert m.settings == ModelSettings(max_batch_size=8, execution="inline")
    on_disk = json.loads((tmp_path / "iris" / "1" / "model.json").read_text())
    assert on_disk["settings"] == {"max_batch_size": 8, "execution": "inline"}

    m = store.configure("iris", 1, {"cache_ttl_s": 60}, unset=["execution"])
    assert m.settings.to_json() == {"max_batch_size": 8, "cache_ttl_s": 60}
    assert store.manifest("iris", 1).settings == m.settings
    assert store.manifest("iris", 1).sha256 == on_disk["sha256"]  # same digest, same keys
    with pytest.raises(ValueError, match="infer_concurrency: 65 is out of range"):
        store.configure("iris", 1, {"infer_concurrency": 65})
    with pytest.raises(ValueError, match="unknown 'batch'"):
        store.configure("iris", 1, {"batch": 1})
    assert store.configure("iris", 1, unset=["max_batch_size", "cache_ttl_s"]).settings \
        == ModelSettings()
    assert "settings" not in json.loads((tmp_path / "iris" / "1" / "model.json").read_text())
    with pytest.raises(ModelNotFound):
        store.configure("iris", 2, {"max_batch_size": 8})


def test_bad_settings_in_a_manifest_refuse_the_version(tmp_path: Path, iris_estimator) -> None:
    store = ModelStore(tmp_path)
    store.register(iris_estimator, "iris", backend="sklearn")
    path = tmp_path / "iris" / "1" / "model.json"
    manifest = json.loads(path.read_text())
    manifest["settings"] = {"max_batch_size": 0}
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactRejected, match="manifest unreadable: max_batch_size: 0 is out"):
        store.load_sync("iris", 1)


def _named(estimator: object, names: tuple[str, ...]) -> object:
    """What scikit-learn remembers when it is fitted on a DataFrame with these columns."""
    target = estimator.steps[0][1] if hasattr(estimator, "steps") else estimator
    target.feature_names_in_ = np.asarray(names, dtype=object)
    return estimator


def test_feature_names_come_from_the_estimator(tmp_path: Path) -> None:
    x, y = iris_data()
    names = ("a", "b", "c", "d")
    est = _named(RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y), names)
    store = ModelStore(tmp_path)
    assert store.register(est, "iris", backend="sklearn").features == names
    assert store.register(est, "iris", backend="sklearn", features=names).features == names
    with pytest.raises(ValueError, match="disagree with those the estimator was fitted with"):
        store.register(est, "iris", backend="sklearn", features=("a", "b", "d", "c"))


@pytest.mark.parametrize("pipeline", [False, True])
def test_dataframe_fitted_model_is_served_plain_rows_without_a_warning(
        tmp_path: Path, pipeline: bool) -> None:
    x, y = iris_data()
    est = RandomForestClassifier(n_estimators=5, random_state=0)
    est = _named((make_pipeline(StandardScaler(), est) if pipeline else est).fit(x, y),
                 IRIS_FEATURES)
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        est.predict(x[:1])  # what every call would say
    store = ModelStore(tmp_path)
    store.register(est, "iris", backend="auto", train_rows=x)  # verification calls it too
    model = store.load_sync("iris", 1)
    assert model.manifest.features == IRIS_FEATURES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = est.predict(x).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.predict(x, prefer_compiled=False) == expected
        model.predict_proba(x, prefer_compiled=False)
        model.predict_both(x, prefer_compiled=False)
    assert getattr(est, "feature_names_in_", None) is not None  # the caller's estimator kept


class _Counting:
    """Counts the calls of a fitted estimator; optionally answers the least likely class."""

    def __init__(self, estimator: object, *, contrary: bool = False) -> None:
        self.estimator = estimator
        self.classes_ = estimator.classes_
        self.n_features_in_ = estimator.n_features_in_
        self.contrary = contrary
        self.calls: list[str] = []

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.calls.append("predict")
        if self.contrary:
            return self.classes_[np.argmin(self.estimator.predict_proba(x), axis=1)]
        return self.estimator.predict(x)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self.calls.append("predict_proba")
        return self.estimator.predict_proba(x)


@pytest.mark.parametrize("backend", ["sklearn", "onnx"])
def test_labels_and_probabilities_in_one_call_where_verified(
        tmp_path: Path, iris_estimator, iris_rows, random_rows, backend: str) -> None:
    counting = _Counting(iris_estimator)
    store = ModelStore(tmp_path, loader=lambda _p: counting)
    m = store.register(iris_estimator, "iris", backend=backend, train_rows=iris_rows)
    assert m.backends["sklearn"]["checks"]["label"]["from_proba"] is True
    model = store.load_sync("iris", 1)
    assert model.both_in_one_call()
    labels, proba = model.predict_both(random_rows)
    # the compiled model gives both in one run; the estimator, its probabilities
    assert counting.calls == ([] if backend == "onnx" else ["predict_proba"])
    assert labels == model.predict(random_rows)
    assert proba == model.predict_proba(random_rows)


def test_labels_not_from_probabilities_take_two_calls(tmp_path: Path, iris_estimator,
                                                      random_rows) -> None:
    contrary = _Counting(iris_estimator, contrary=True)
    store = ModelStore(tmp_path, loader=lambda _p: contrary)
    m = store.register(contrary, "odd", backend="sklearn")
    assert m.backends["sklearn"]["checks"]["label"]["from_proba"] is False
    model = store.load_sync("odd", 1)
    assert not model.both_in_one_call()
    contrary.calls.clear()
    labels, _ = model.predict_both(random_rows)
    assert contrary.calls == ["predict", "predict_proba"]
    assert labels == contrary.predict(random_rows).tolist()


@pytest.mark.e2e
def test_model_store_imports_nothing_from_gateway() -> None:
    import subprocess
    import sys

    code = ("import sys, model_store, model_store.__main__, model_store.estimators; "
            "bad = [m for m in sys.modules if m == 'gateway' or m.startswith('gateway.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_registered_version_is_readable_by_others_under_a_common_umask(
        tmp_path: Path, iris_estimator) -> None:
    old = os.umask(0o022)
    try:
        ModelStore(tmp_path).register(iris_estimator, "iris")
    finally:
        os.umask(old)
    version_dir = tmp_path / "iris" / "1"
    assert stat.S_IMODE(version_dir.stat().st_mode) == 0o755
    for f in version_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f.name
