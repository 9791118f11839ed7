"""Compiled backend: the estimator converted to ONNX (skl2onnx) and run by onnxruntime.

A compiled artifact is served for an output only if it was verified against the estimator
for that output on the verification rows: labels must agree on every row, probabilities within
``proba_atol``, regression values within ``value_rtol`` times the largest value's magnitude
(at least 1): a float32 model's error scales with the values it sums.

The conversion is the first that verifies, in this order:

* ``float64``: float64 input throughout (exact for linear models);
* ``float64+float32`` (pipelines): the transforms in float64, the final estimator in float32,
  as scikit-learn's trees round their input (the ONNX-ML tree operators need float32);
* ``float32``: float32 input throughout.

scikit-learn's own trees (``tree_``: decision trees, forests, gradient boosting) compare
features as float32 against float64 thresholds; a float64 tree model is therefore fed rows
rounded through float32 (``round_input``), and a float32 one gets thresholds skl2onnx adjusts
for that comparison. Whatever the conversion, ``OnnxModel`` takes the gateway's float64 rows
and casts inside.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

__all__ = [
    "CompileError",
    "Compiled",
    "Expected",
    "InputType",
    "OnnxModel",
    "OutputCheck",
    "Runs",
    "compile_estimator",
    "compiled_library_versions",
    "convert_onnx",
    "labels_from_proba",
    "sklearn_checks",
    "verification_rows",
    "verify",
    "verify_backend",
]

log = logging.getLogger("model_store.compiled")

ONNX_ARTIFACT = "model.onnx"

InputType = Literal["float64", "float64+float32", "float32"]
_INPUT_TYPES: tuple[InputType, ...] = ("float64", "float64+float32", "float32")
_OPSETS = {"": 17, "ai.onnx.ml": 3}


class CompileError(Exception):
    """The estimator cannot be converted, or the converted model cannot be loaded."""


@dataclass(frozen=True, slots=True)
class OutputCheck:
    """What verification found for one output.

    ``mismatches`` counts labels that differ (classification) or values outside the tolerance
    (regression); ``max_abs_diff`` is the largest probability or value difference; ``atol``
    and ``rtol`` are the tolerance applied. ``from_proba`` (classifier labels only): the labels
    equal ``classes[argmax(probabilities)]`` of this backend on every row, ties included.
    """

    verified: bool
    rows: int
    mismatches: int
    max_abs_diff: float
    atol: float
    rtol: float = 0.0
    from_proba: bool | None = None
    reason: str = ""  # why it is not verified; empty when it is

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "verified": self.verified, "rows": self.rows, "mismatches": self.mismatches,
            "max_abs_diff": self.max_abs_diff, "atol": self.atol, "rtol": self.rtol,
        }
        if self.from_proba is not None:
            data["from_proba"] = self.from_proba
        if self.reason:
            data["reason"] = self.reason
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutputCheck:
        from_proba = data.get("from_proba")
        return cls(bool(data["verified"]), int(data["rows"]), int(data["mismatches"]),
                   float(data["max_abs_diff"]), float(data["atol"]),
                   float(data.get("rtol", 0.0)),
                   None if from_proba is None else bool(from_proba),
                   str(data.get("reason", "")))


def compiled_library_versions() -> dict[str, str]:
    import onnxruntime
    import skl2onnx

    return {"skl2onnx": skl2onnx.__version__, "onnxruntime": onnxruntime.__version__}


def convert_onnx(estimator: Any, n_features: int, input_type: InputType = "float64") -> bytes:
    """The serialized ONNX model of ``estimator`` converted as ``input_type`` (see the module
    docstring); outputs label (or value) and, for classifiers, probabilities as a plain
    tensor. The model is loaded once to make sure onnxruntime accepts it. Raises CompileError.
    """
    try:
        if input_type == "float64+float32":
            onx = _convert_split(estimator, n_features)
        else:
            onx = _to_onnx(estimator, n_features, np.dtype(input_type))
    except CompileError:
        raise
    except Exception as exc:  # the converter's errors are not typed; named in the message
        raise CompileError(f"skl2onnx cannot convert {type(estimator).__name__} "
                           f"({input_type}): {type(exc).__name__}: {_first_line(exc)}") from exc
    data: bytes = onx.SerializeToString()
    OnnxModel(data, getattr(estimator, "classes_", None))  # must load, or it is no use
    return data


def _to_onnx(estimator: Any, n_features: int, dtype: np.dtype[Any]) -> Any:
    try:
        from skl2onnx import to_onnx
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CompileError(f"skl2onnx is not installed: {exc}") from exc
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "classes_") else None
    with _int_missing_flags():
        return to_onnx(estimator, np.zeros((1, n_features), dtype=dtype), options=options,
                       target_opset=_OPSETS)


def _convert_split(estimator: Any, n_features: int) -> Any:
    """A pipeline's transforms converted with float64 input, joined by a cast to its final
    estimator converted with float32 input."""
    from onnx import TensorProto, compose, helper
    from sklearn.pipeline import Pipeline

    if not isinstance(estimator, Pipeline) or len(estimator.steps) < 2:
        raise CompileError("float64+float32 applies to pipelines only")
    final = estimator.steps[-1][1]
    width = getattr(final, "n_features_in_", None)
    if width is None:
        raise CompileError("the pipeline's final step has no n_features_in_")
    head = _to_onnx(Pipeline(estimator.steps[:-1]), n_features, np.dtype(np.float64))
    tail = _to_onnx(final, int(width), np.dtype(np.float32))
    joint = "X_float64"
    tail.graph.node.insert(0, helper.make_node("Cast", [joint], [tail.graph.input[0].name],
                                               to=TensorProto.FLOAT))
    del tail.graph.input[:]
    tail.graph.input.append(helper.make_tensor_value_info(joint, TensorProto.DOUBLE,
                                                          [None, int(width)]))
    opsets: dict[str, int] = {}
    for model in (head, tail):
        for o in model.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    for model in (head, tail):
        del model.opset_import[:]
        model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    return compose.merge_models(head, tail, io_map=[(head.graph.output[0].name, joint)],
                                prefix1="transform_")


@contextlib.contextmanager
def _int_missing_flags() -> Iterator[None]:
    """skl2onnx 1.20 passes a Python bool as a leaf's ``nodes_missing_value_tracks_true`` for
    histogram gradient boosting, which the protobuf of onnx 1.17+ refuses in an ints field.
    While converting, its node builder gets an int instead (same value)."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    def add_node(*args: Any, nodes_missing_value_tracks_true: Any = 0, **kwargs: Any) -> Any:
        return original(*args, nodes_missing_value_tracks_true=int(
            nodes_missing_value_tracks_true), **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


class OnnxModel:
    """An onnxruntime session over a converted estimator, single-threaded per call.

    Takes float64 rows; casts them to the model's input type (float32 models), or rounds them
    through float32 when ``round_input`` (float64 models of scikit-learn trees).
    """

    def __init__(self, data: bytes, classes: Any, *, round_input: bool = False) -> None:
        try:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(data, sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors on load
            raise CompileError(f"onnxruntime cannot load the model: {_first_line(exc)}"
                               ) from exc
        first = self._session.get_inputs()[0]
        self._input = first.name
        self.input_type: InputType = "float32" if first.type == "tensor(float)" else "float64"
        self.round_input = round_input and self.input_type == "float64"
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._classes = None if classes is None else np.asarray(classes)

    def _feed(self, rows: np.ndarray) -> np.ndarray:
        if self.input_type == "float32":
            return np.ascontiguousarray(rows, dtype=np.float32)
        if self.round_input:
            return np.ascontiguousarray(rows, dtype=np.float32).astype(np.float64)
        return np.ascontiguousarray(rows, dtype=np.float64)

    def run(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (or values) and, for classifiers, probabilities (float64): one call."""
        out: list[Any] = self._session.run(self._outputs, {self._input: self._feed(rows)})
        labels = np.asarray(out[0]).reshape(len(rows))
        proba = np.asarray(out[1], dtype=np.float64) if len(out) > 1 else None
        return labels, proba

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return self.run(rows)[0]

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        proba = self.run(rows)[1]
        if proba is None:
            raise CompileError("this compiled model has no probabilities output")
        return proba


def labels_from_proba(classes: Any, proba: np.ndarray) -> np.ndarray:
    """``classes[argmax(proba)]`` per row (the first class on a tie, as scikit-learn does)."""
    labels: np.ndarray = np.asarray(classes).take(np.argmax(proba, axis=1))
    return labels


def verification_rows(estimator: Any, n_features: int, train_rows: np.ndarray | None = None,
                      *, generated: int = 10_000, seed: int = 0,
                      splits: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """The training rows (if any) plus ``generated`` rows drawn uniformly over each feature's
    range: the training range, else the span of the trees' thresholds, else [-10, 10].
    A quarter of the generated rows sit exactly on thresholds, where rounding would show.
    For a pipeline ending in trees, half the generated rows are drawn that way in the space
    its final step sees and mapped back through the transforms' ``inverse_transform``, so
    they land on (within rounding of) the final step's thresholds too. ``splits`` (feature
    index, threshold arrays) stand for the estimator's own where it is not a scikit-learn tree
    model (a booster's)."""
    rng = np.random.default_rng(seed)
    train = None if train_rows is None else np.asarray(train_rows, dtype=np.float64)
    parts = [] if train is None else [train]
    head, final = _split(estimator)
    if head is not None and _splits(final) and hasattr(head, "inverse_transform"):
        width = int(getattr(final, "n_features_in_", n_features))
        inner_train = None if train is None or not len(train) else head.transform(train)
        inner = _generated(_splits(final), width, inner_train, generated // 2, rng)
        try:
            mapped = np.asarray(head.inverse_transform(inner), dtype=np.float64)
        except (ValueError, TypeError, AttributeError, NotImplementedError):
            mapped = None
        if mapped is not None and mapped.shape == (len(inner), n_features) and np.all(
                np.isfinite(mapped)):
            parts.append(mapped)
            generated -= len(inner)
    parts.append(_generated(_splits(estimator) if splits is None else splits, n_features,
                            train, generated, rng))
    return np.vstack(parts)


def _split(estimator: Any) -> tuple[Any, Any]:
    """A pipeline's transforms (as one pipeline) and its final step; (None, estimator) for
    anything else."""
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline) and len(estimator.steps) >= 2:
        return Pipeline(estimator.steps[:-1]), estimator.steps[-1][1]
    return None, estimator


def _splits(estimator: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """(feature index, threshold) arrays of every split of a tree model: scikit-learn's
    ``tree_`` models and histogram gradient boosting; empty for anything else."""
    out = []
    for tree in _trees(estimator):
        inner = tree.feature >= 0
        out.append((tree.feature[inner], tree.threshold[inner]))
    for predictors in getattr(estimator, "_predictors", None) or []:
        for predictor in predictors:
            nodes = predictor.nodes
            inner = nodes["is_leaf"] == 0
            out.append((nodes["feature_idx"][inner], nodes["num_threshold"][inner]))
    return out


def _generated(splits: list[tuple[np.ndarray, np.ndarray]], n_features: int,
               train: np.ndarray | None, count: int, rng: np.random.Generator) -> np.ndarray:
    lo = np.full(n_features, -10.0)
    hi = np.full(n_features, 10.0)
    thresholds: list[list[float]] = [[] for _ in range(n_features)]
    for features, values in splits:
        for f, t in zip(features.tolist(), values.tolist(), strict=True):
            thresholds[int(f)].append(float(t))
    if train is not None and len(train):
        lo, hi = train.min(axis=0), train.max(axis=0)
    elif any(thresholds):
        for f, ts in enumerate(thresholds):
            if ts:
                lo[f], hi[f] = min(ts), max(ts)
    span = np.where(hi > lo, hi - lo, 1.0)
    rows = rng.uniform(lo - 0.1 * span, hi + 0.1 * span, size=(count, n_features))
    on_edge = rng.random((count, n_features)) < 0.25
    # On a threshold, or half a float32 step either side of it: where a model that compares
    # in float64 and one that rounds to float32 would part.
    nudge = 1.0 + rng.choice([-1.0, 0.0, 0.0, 1.0], size=count) * 2.0 ** -25
    for f, ts in enumerate(thresholds):
        if ts:
            picks = rng.choice(np.asarray(ts), size=count) * nudge
            rows[:, f] = np.where(on_edge[:, f], picks, rows[:, f])
    return rows


def _trees(estimator: Any) -> list[Any]:
    """The ``tree_`` objects of a scikit-learn tree model (empty for anything else)."""
    estimators = getattr(estimator, "estimators_", None)
    if estimators is None:
        tree = getattr(estimator, "tree_", None)
        return [tree] if tree is not None else []
    flat = np.ravel(np.asarray(estimators, dtype=object))
    return [e.tree_ for e in flat if hasattr(e, "tree_")]


@dataclass(frozen=True, slots=True)
class Expected:
    """The estimator's answers on the verification rows, computed once (``Expected.of``)."""

    rows: np.ndarray
    labels: np.ndarray
    proba: np.ndarray | None
    classes: np.ndarray | None

    @classmethod
    def of(cls, estimator: Any, rows: np.ndarray) -> Expected:
        classes = getattr(estimator, "classes_", None)
        proba = None
        if classes is not None and hasattr(estimator, "predict_proba"):
            proba = np.asarray(estimator.predict_proba(rows), dtype=np.float64)
        return cls(rows, np.asarray(estimator.predict(rows)), proba,
                   None if classes is None else np.asarray(classes))


def sklearn_checks(expected: Expected) -> dict[str, Any]:
    """What the estimator itself shows on the verification rows: for a classifier with
    probabilities, whether its labels equal ``classes[argmax(predict_proba)]`` on every row
    (``{"label": {"rows": n, "from_proba": bool}}``); empty otherwise."""
    if expected.proba is None or expected.classes is None:
        return {}
    n = len(expected.rows)
    same = _same_labels(expected.labels, labels_from_proba(expected.classes, expected.proba))
    return {"label": {"rows": n, "from_proba": same == n}}


def _same_labels(expected: np.ndarray, got: np.ndarray) -> int:
    """Rows whose label agrees (labels compared as Python objects, in the expected dtype)."""
    try:
        cast = got.astype(expected.dtype)
    except (TypeError, ValueError):
        cast = got
    return int(np.sum(expected.astype(object) == cast.astype(object)))


class Runs(Protocol):
    """A backend that answers labels (or values) and probabilities from one call."""

    def run(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


def verify(estimator: Any, compiled: OnnxModel, rows: np.ndarray, proba_atol: float,
           value_rtol: float = 1e-5) -> dict[str, OutputCheck]:
    """Compare ``compiled`` with ``estimator`` on ``rows``, per output."""
    return _verify(Expected.of(estimator, rows), compiled, proba_atol, value_rtol,
                   compiled.input_type)


def _verify(expected: Expected, compiled: OnnxModel, proba_atol: float,
            value_rtol: float, conversion: str) -> dict[str, OutputCheck]:
    return verify_backend(expected, compiled, proba_atol, value_rtol, f"{conversion} input")


def verify_backend(expected: Expected, backend: Runs, proba_atol: float, value_rtol: float,
                   where: str) -> dict[str, OutputCheck]:
    """Compare ``backend``'s answers on ``expected.rows`` with ``expected``, per output (see
    the module docstring for the tolerances); ``where`` starts each reason."""
    n = len(expected.rows)
    labels, proba = backend.run(expected.rows)
    checks: dict[str, OutputCheck] = {}
    if expected.classes is None:  # regression: values within a relative tolerance
        want = expected.labels.astype(np.float64)
        diff = np.abs(labels.astype(np.float64) - want)
        scale = max(1.0, float(np.max(np.abs(want)))) if n else 1.0
        bad = int(np.sum(~(diff <= value_rtol * scale)))
        worst = float(np.max(diff)) if n else 0.0
        reason = (f"{where}: {bad} of {n} values differ by more than {value_rtol:g} x "
                  f"{scale:.3g} (max {worst:.3g})") if bad else ""
        checks["label"] = OutputCheck(bad == 0, n, bad, worst, 0.0, value_rtol, reason=reason)
        return checks
    bad = n - _same_labels(expected.labels, labels)
    from_proba = None
    if expected.proba is not None and proba is not None:
        derived = labels_from_proba(expected.classes, proba)
        from_proba = _same_labels(expected.labels, derived) == n
    reason = f"{where} changes {bad} of {n} labels" if bad else ""
    checks["label"] = OutputCheck(bad == 0, n, bad, 0.0, 0.0, from_proba=from_proba,
                                  reason=reason)
    if expected.proba is not None and proba is not None:
        if proba.shape != expected.proba.shape:
            checks["probabilities"] = OutputCheck(
                False, n, 0, 1.0, proba_atol,
                reason=f"{where}: probabilities of shape {proba.shape}, "
                       f"expected {expected.proba.shape}")
        else:
            worst = float(np.max(np.abs(proba - expected.proba))) if n else 0.0
            ok = worst <= proba_atol
            reason = "" if ok else (f"{where}: probabilities differ by {worst:.3g} "
                                    f"(atol {proba_atol:g})")
            checks["probabilities"] = OutputCheck(ok, n, 0, worst, proba_atol, reason=reason)
    return checks


@dataclass(frozen=True, slots=True)
class Compiled:
    """The converted model chosen for an estimator, and what verification found."""

    data: bytes
    input_type: InputType
    round_input: bool
    checks: dict[str, OutputCheck]
    tried: dict[str, str] = field(default_factory=dict)  # input type -> why not chosen

    @property
    def verified_outputs(self) -> int:
        return sum(c.verified for c in self.checks.values())


def compile_estimator(estimator: Any, n_features: int, expected: Expected, *,
                      proba_atol: float = 1e-6, value_rtol: float = 1e-5) -> Compiled:
    """Convert ``estimator`` each way in turn (see the module docstring) and verify each
    conversion against ``expected`` (its answers on the verification rows); the first whose
    every output verifies is chosen, else the one with the most verified outputs (the earlier
    on a tie).

    Raises:
        CompileError: no conversion works (the message names each reason).
    """
    round_input = bool(_trees(estimator))
    best: Compiled | None = None
    tried: dict[str, str] = {}
    for input_type in _INPUT_TYPES:
        try:
            data = convert_onnx(estimator, n_features, input_type)
            model = OnnxModel(data, expected.classes, round_input=round_input)
        except CompileError as exc:
            tried[input_type] = str(exc)
            continue
        checks = _verify(expected, model, proba_atol, value_rtol, input_type)
        candidate = Compiled(data, input_type, model.round_input, checks)
        if best is None or candidate.verified_outputs > best.verified_outputs:
            if best is not None:
                tried[best.input_type] = _why(best)
            best = candidate
        else:
            tried[input_type] = _why(candidate)
        if candidate is best and best.verified_outputs == len(checks):
            break
    if best is None:
        raise CompileError("; ".join(tried.values()))
    return Compiled(best.data, best.input_type, best.round_input, best.checks,
                    {k: v for k, v in tried.items() if k != best.input_type})


def _why(candidate: Compiled) -> str:
    reasons = [c.reason for c in candidate.checks.values() if c.reason]
    return "; ".join(reasons) or "another input type verified more outputs"
