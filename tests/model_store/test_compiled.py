"""Compiled (ONNX) backend: conversion, per-output verification, verified loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import (
    ExtraTreesRegressor,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model_store import ArtifactRejected, ModelStore
from model_store.compiled import CompileError, OnnxModel, convert_onnx, verification_rows, verify
from model_store.demo import IRIS_FEATURES, iris_data


def test_verified_compiled_model_serves_both_outputs(compiled_store: Path, iris_rows,
                                                     random_rows, iris_estimator) -> None:
    model = ModelStore(compiled_store).load_sync("iris", 1)
    assert model.compiled is not None
    assert model.backends() == {"label": "onnx", "probabilities": "onnx"}
    assert model.backends(prefer_compiled=False) == {"label": "sklearn",
                                                     "probabilities": "sklearn"}
    checks = model.manifest.backends["onnx"]["checks"]
    assert checks["label"]["rows"] >= 10_000 + 150 and checks["label"]["mismatches"] == 0
    rows = np.vstack([iris_rows, np.random.default_rng(5).uniform(0, 8, size=(10_000, 4)),
                      random_rows])
    assert model.predict(rows) == iris_estimator.predict(rows).tolist()
    assert np.allclose(model.predict_proba(rows), iris_estimator.predict_proba(rows),
                       rtol=0, atol=1e-6)


def _perturbed(data: bytes) -> bytes:
    proto = onnx.load_from_string(data)
    for node in proto.graph.node:
        if node.op_type == "TreeEnsembleClassifier":
            for attr in node.attribute:
                if attr.name == "nodes_values":  # every split threshold, shifted
                    attr.floats[:] = [v + 0.35 for v in attr.floats]
                if attr.name == "nodes_values_as_tensor":
                    values = onnx.numpy_helper.to_array(attr.t) + 0.35
                    attr.t.CopyFrom(onnx.numpy_helper.from_array(values, attr.t.name))
    return proto.SerializeToString()


def test_verification_rejects_a_perturbed_compiled_model(iris_estimator, iris_rows) -> None:
    data = convert_onnx(iris_estimator, 4)
    rows = verification_rows(iris_estimator, 4, iris_rows)
    good = verify(iris_estimator, OnnxModel(data, iris_estimator.classes_, round_input=True), rows,
                  1e-6)
    assert good["label"].verified and good["probabilities"].verified
    bad = verify(iris_estimator, OnnxModel(_perturbed(data), iris_estimator.classes_,
                                          round_input=True), rows,
                 1e-6)
    assert not bad["label"].verified and bad["label"].mismatches > 0
    assert not bad["probabilities"].verified and bad["probabilities"].max_abs_diff > 1e-3


def test_outputs_are_verified_separately(tmp_path: Path, iris_estimator, iris_rows) -> None:
    store = ModelStore(tmp_path)
    m = store.register(iris_estimator, "iris", features=IRIS_FEATURES, backend="onnx",
                       train_rows=iris_rows, proba_atol=0.0)  # float rounding fails atol 0
    checks = m.backends["onnx"]["checks"]
    assert checks["label"]["verified"] and not checks["probabilities"]["verified"]
    assert 0 < checks["probabilities"]["max_abs_diff"] < 1e-6
    model = store.load_sync("iris", 1)
    assert model.backends() == {"label": "onnx", "probabilities": "sklearn"}
    assert model.predict_proba(iris_rows) == iris_estimator.predict_proba(iris_rows).tolist()


def test_tampered_compiled_artifact_is_refused(tmp_path: Path, iris_estimator) -> None:
    store = ModelStore(tmp_path)
    store.register(iris_estimator, "iris", features=IRIS_FEATURES, backend="onnx")
    path = tmp_path / "iris" / "1" / "model.onnx"
    path.write_bytes(_perturbed(path.read_bytes()))
    with pytest.raises(ArtifactRejected, match=r"model\.onnx: sha256 mismatch"):
        store.load_sync("iris", 1)


class Unconvertible(ClassifierMixin, BaseEstimator):
    """A classifier no converter knows."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> Unconvertible:
        self.classes_ = np.unique(y)
        self.n_features_in_ = x.shape[1]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.where(x[:, 0] > 5.5, self.classes_[-1], self.classes_[0])

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = np.zeros((len(x), len(self.classes_)))
        p[np.arange(len(x)), np.where(x[:, 0] > 5.5, len(self.classes_) - 1, 0)] = 1
        return p


def test_unconvertible_model_falls_back_to_sklearn_with_a_logged_reason(
        tmp_path: Path, iris_rows, caplog: pytest.LogCaptureFixture) -> None:
    est: Any = Unconvertible().fit(iris_rows, np.array(["a", "b"] * 75))
    store = ModelStore(tmp_path, loader=lambda _p: est)
    with caplog.at_level(logging.WARNING, logger="model_store"):
        m = store.register(est, "odd", backend="auto")
    assert "not compiled, serving sklearn" in caplog.text
    assert "cannot convert Unconvertible" in m.backends["onnx"]["error"]
    assert store.load_sync("odd", 1).backends() == {"label": "sklearn",
                                                     "probabilities": "sklearn"}
    with pytest.raises(CompileError):
        ModelStore(tmp_path / "other").register(est, "odd", backend="onnx")


def test_compile_an_existing_version(tmp_path: Path, iris_estimator) -> None:
    store = ModelStore(tmp_path)
    store.register(iris_estimator, "iris", features=IRIS_FEATURES, backend="sklearn")
    assert store.load_sync("iris", 1).compiled is None
    m = store.compile("iris", 1)
    on_disk = json.loads((tmp_path / "iris" / "1" / "model.json").read_text())
    assert on_disk["backends"]["onnx"]["sha256"] == m.backends["onnx"]["sha256"]
    assert store.load_sync("iris", 1).backends() == {"label": "onnx", "probabilities": "onnx"}
    assert m.sha256 == store.manifest("iris", 1).sha256  # same version digest, same keys


def _diabetes() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


@pytest.mark.parametrize(("make", "conversion"), [
    (lambda: LinearRegression(), "float64"),
    (lambda: ExtraTreesRegressor(n_estimators=3, random_state=0), "float32"),
    (lambda: make_pipeline(StandardScaler(), RandomForestRegressor(n_estimators=3,
                                                                   random_state=0)),
     "float64+float32"),
])
def test_each_estimator_gets_the_conversion_that_verifies(tmp_path: Path, make: Any,
                                                          conversion: str) -> None:
    x, y = _diabetes()
    est = make().fit(x, y)
    m = ModelStore(tmp_path).register(est, "reg", train_rows=x)
    onnx_entry = m.backends["onnx"]
    assert onnx_entry["input"] == conversion
    check = onnx_entry["checks"]["label"]
    assert check["verified"] and check["rtol"] == 1e-5 and check["rows"] == 10_000 + len(x)
    model = ModelStore(tmp_path).load_sync("reg", 1)
    assert model.backends() == {"label": "onnx"}
    rows = verification_rows(est, x.shape[1], x, seed=3)  # float64 rows, as the gateway's
    got, want = np.asarray(model.predict(rows)), est.predict(rows)
    assert np.all(np.abs(got - want) <= 1e-5 * max(1.0, float(np.max(np.abs(want)))))


def test_where_float32_changes_a_label_sklearn_serves_and_the_manifest_says_why(
        tmp_path: Path, iris_rows) -> None:
    x, y = iris_data()
    est = HistGradientBoostingClassifier(max_iter=5, random_state=0).fit(x, y)
    m = ModelStore(tmp_path).register(est, "hgb", train_rows=iris_rows)
    onnx_entry = m.backends["onnx"]
    label = onnx_entry["checks"]["label"]
    assert not label["verified"] and label["mismatches"] > 0
    assert label["reason"].startswith(f"float32 input changes {label['mismatches']} of ")
    assert "float64" in onnx_entry["tried"]
    model = ModelStore(tmp_path).load_sync("hgb", 1)
    assert model.backends() == {"label": "sklearn", "probabilities": "sklearn"}
    assert model.predict(x) == est.predict(x).tolist()


def test_a_manifest_without_input_type_is_read_as_before(tmp_path: Path, iris_estimator,
                                                         iris_rows, random_rows) -> None:
    store = ModelStore(tmp_path)
    store.register(iris_estimator, "iris", features=IRIS_FEATURES, train_rows=iris_rows)
    path = tmp_path / "iris" / "1" / "model.json"
    manifest = json.loads(path.read_text())
    assert manifest["backends"]["onnx"].pop("input") == "float64"
    assert manifest["backends"]["onnx"].pop("round_input") is True
    path.write_text(json.dumps(manifest))
    model = store.load_sync("iris", 1)
    assert model.compiled is not None and model.compiled.round_input
    assert model.predict(random_rows) == iris_estimator.predict(random_rows).tolist()


def test_pipeline_rows_reach_the_final_trees_thresholds(iris_rows) -> None:
    x, y = iris_data()
    est = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=3,
                                                                 random_state=0)).fit(x, y)
    rows = verification_rows(est, 4, iris_rows, generated=2000)
    inner = est[:-1].transform(rows[len(iris_rows):])
    thresholds = {float(t) for e in est[-1].estimators_ for t in e.tree_.threshold
                  if t != -2}
    close = [min(abs(v - t) for t in thresholds) < 1e-6 for v in inner[:, 2]]
    assert sum(close) > 100  # about a quarter of the mapped half sit on a threshold
