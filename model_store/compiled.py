"""Compiled backend: the estimator converted to ONNX (skl2onnx) and run by onnxruntime.

A compiled artifact is served for an output only if it was verified against the estimator
for that output: labels must agree on every verification row, probabilities within ``atol``.
Trees in scikit-learn compare features as float32 against float64 thresholds; the ONNX model
takes float64 inputs rounded through float32, so it makes the very same comparisons.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CompileError",
    "OnnxModel",
    "OutputCheck",
    "compiled_library_versions",
    "convert_onnx",
    "verification_rows",
    "verify",
]

log = logging.getLogger("model_store.compiled")

ONNX_ARTIFACT = "model.onnx"


class CompileError(Exception):
    """The estimator cannot be converted, or the converted model cannot be loaded."""


@dataclass(frozen=True, slots=True)
class OutputCheck:
    """What verification found for one output."""

    verified: bool
    rows: int
    mismatches: int  # labels that differ (labels only)
    max_abs_diff: float  # largest probability difference (probabilities only)
    atol: float

    def to_json(self) -> dict[str, Any]:
        return {"verified": self.verified, "rows": self.rows, "mismatches": self.mismatches,
                "max_abs_diff": self.max_abs_diff, "atol": self.atol}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutputCheck:
        return cls(bool(data["verified"]), int(data["rows"]), int(data["mismatches"]),
                   float(data["max_abs_diff"]), float(data["atol"]))


def compiled_library_versions() -> dict[str, str]:
    import onnxruntime
    import skl2onnx

    return {"skl2onnx": skl2onnx.__version__, "onnxruntime": onnxruntime.__version__}


def convert_onnx(estimator: Any, n_features: int) -> bytes:
    """The serialized ONNX model of ``estimator`` (float64 input ``X``; outputs label and, for
    classifiers, probabilities as a plain tensor). Raises CompileError."""
    try:
        from skl2onnx import to_onnx
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CompileError(f"skl2onnx is not installed: {exc}") from exc
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "classes_") else None
    sample = np.zeros((1, n_features), dtype=np.float64)
    try:
        onx = to_onnx(estimator, sample, options=options,
                      target_opset={"": 17, "ai.onnx.ml": 3})
    except Exception as exc:  # the converter's errors are not typed; named in the message
        raise CompileError(f"skl2onnx cannot convert {type(estimator).__name__}: "
                           f"{type(exc).__name__}: {exc}") from exc
    data: bytes = onx.SerializeToString()
    OnnxModel(data, getattr(estimator, "classes_", None))  # must load, or it is no use
    return data


class OnnxModel:
    """An onnxruntime session over a converted estimator, single-threaded per call."""

    def __init__(self, data: bytes, classes: Any) -> None:
        try:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(data, sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors on load
            raise CompileError(f"onnxruntime cannot load the model: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._classes = None if classes is None else np.asarray(classes)

    def _run(self, rows: np.ndarray) -> list[Any]:
        x = np.ascontiguousarray(rows, dtype=np.float32).astype(np.float64)
        out: list[Any] = self._session.run(self._outputs, {self._input: x})
        return out

    def predict(self, rows: np.ndarray) -> np.ndarray:
        label = self._run(rows)[0]
        return np.asarray(label).reshape(len(rows))

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(rows)[1], dtype=np.float64)


def verification_rows(estimator: Any, n_features: int, train_rows: np.ndarray | None = None,
                      *, generated: int = 10_000, seed: int = 0) -> np.ndarray:
    """The training rows (if any) plus ``generated`` rows drawn uniformly over each feature's
    range: the training range, else the span of the trees' thresholds, else [-10, 10].
    A quarter of the generated rows sit exactly on thresholds, where rounding would show."""
    rng = np.random.default_rng(seed)
    lo = np.full(n_features, -10.0)
    hi = np.full(n_features, 10.0)
    thresholds: list[list[float]] = [[] for _ in range(n_features)]
    for tree in _trees(estimator):
        for f, t in zip(tree.feature, tree.threshold, strict=True):
            if f >= 0:
                thresholds[f].append(float(t))
    if train_rows is not None and len(train_rows):
        lo, hi = train_rows.min(axis=0), train_rows.max(axis=0)
    elif any(thresholds):
        for f, ts in enumerate(thresholds):
            if ts:
                lo[f], hi[f] = min(ts), max(ts)
    span = np.where(hi > lo, hi - lo, 1.0)
    rows = rng.uniform(lo - 0.1 * span, hi + 0.1 * span, size=(generated, n_features))
    on_edge = rng.random((generated, n_features)) < 0.25
    for f, ts in enumerate(thresholds):
        if ts:
            picks = rng.choice(np.asarray(ts), size=generated)
            rows[:, f] = np.where(on_edge[:, f], picks, rows[:, f])
    parts = [rows] if train_rows is None else [np.asarray(train_rows, dtype=np.float64), rows]
    return np.vstack(parts)


def _trees(estimator: Any) -> list[Any]:
    estimators = getattr(estimator, "estimators_", None)
    if estimators is None:
        tree = getattr(estimator, "tree_", None)
        return [tree] if tree is not None else []
    flat = np.ravel(np.asarray(estimators, dtype=object))
    return [e.tree_ for e in flat if hasattr(e, "tree_")]


def verify(estimator: Any, compiled: OnnxModel, rows: np.ndarray,
           proba_atol: float) -> dict[str, OutputCheck]:
    """Compare ``compiled`` with ``estimator`` on ``rows``, per output."""
    checks: dict[str, OutputCheck] = {}
    expected = np.asarray(estimator.predict(rows))
    got = compiled.predict(rows)
    mismatches = int(np.sum(expected.astype(object) != got.astype(expected.dtype).astype(object)))
    checks["label"] = OutputCheck(mismatches == 0, len(rows), mismatches, 0.0, 0.0)
    if hasattr(estimator, "predict_proba") and hasattr(estimator, "classes_"):
        diff = float(np.max(np.abs(estimator.predict_proba(rows) - compiled.predict_proba(rows))))
        checks["probabilities"] = OutputCheck(diff <= proba_atol, len(rows), 0, diff,
                                              proba_atol)
    return checks
