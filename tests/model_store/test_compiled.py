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

from model_store import ArtifactRejected, ModelStore
from model_store.compiled import CompileError, OnnxModel, convert_onnx, verification_rows, verify
from model_store.demo import IRIS_FEATURES


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
