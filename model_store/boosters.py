"""XGBoost and LightGBM: native model files loaded without unpickling, and scikit-learn wrappers
served through their booster.

A model *family* is a loader plus the backend that serves it:

* ``xgboost``: a ``Booster.save_model`` file, JSON (``.json``) or UBJSON (``.ubj``), or a
  joblib-pickled ``XGBClassifier``/``XGBRegressor`` (and their random-forest variants);
* ``lightgbm``: a text model file (``Booster.save_model``, ``.txt``), or a joblib-pickled
  ``LGBMClassifier``/``LGBMRegressor``;
* ``sklearn``: anything else with ``predict`` (``model_store.store`` and ``compiled``).

**Native files** are read here before the library sees them (``inspect_native``): the JSON or
UBJSON document, or the text model's header and every tree block, must be complete and
consistent (array lengths, child and feature indices), because xgboost 3.2 and lightgbm 4.7
crash the process on a truncated file instead of raising. That refuses truncated and
inconsistent files, not every corruption (in a fuzz run, 9 of 1,200 damaged files still crashed
a library), so a file from outside is then loaded and predicted with in a child process
(``probe_native``, run by ``model_store.store`` through ``model_store.child``): a crash there
refuses the file. Only then does this process load the very bytes whose sha256 the manifest
records. What the model is comes from the file: its objective gives the task
(``binary:logistic``/``binary``: two classes, default labels 0 and 1; ``multi:softprob``,
``multi:softmax``/``multiclass``: ``num_class`` classes, default labels 0..k-1; XGBoost's
``reg:*`` and ``count:poisson``, LightGBM's regression objectives: values), its feature count
and names (XGBoost ``feature_names``; LightGBM ``feature_name()``, whose automatic
``Column_<i>`` count as none). Other objectives (ranking, ``binary:logitraw``,
``binary:hinge``, ``multiclassova`` whose probabilities do not sum to 1, custom ones),
multi-output models and XGBoost categorical features are refused with the reason.

**BoosterModel** is the backend that serves a family (``BoosterAnswers`` shapes its answers,
and those of the compiled candidates in ``model_store.booster_compiled``): one library call
per model call
(XGBoost ``inplace_predict``; LightGBM ``LGBM_BoosterPredictForMat``, the C function its
``Booster.predict`` ends in, called directly on the float64 rows), the
probabilities built as the scikit-learn wrapper builds them (binary: ``[1 - p, p]`` in the
library's dtype; ``multi:softmax``: softmax of the margins) and labels as
``classes[argmax(probabilities)]`` (the first class on a tie: ``p > 0.5`` for class 1, as
both wrappers decide). Registration verifies it against the library's own predict (the
wrapper's ``predict``/``predict_proba``, or for a native file ``Booster.predict`` on a
``DMatrix`` / LightGBM's ``Booster.predict`` with its defaults) before it serves.

**Threads.** A model call runs in the gateway's worker thread (or inline when tiny), beside the
event loop. ``BoosterModel`` runs the library with ``threads`` threads (XGBoost ``nthread``,
LightGBM ``num_threads``), 1 unless the version's ``threads`` setting says otherwise: a second
OpenMP thread takes the event loop's core, and its barrier waits for a thread the loop has
descheduled (docs/models.md has the measurements).

Neither library is imported until a model of its family is read.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "ARTIFACTS",
    "DEFAULT_THREADS",
    "FAMILIES",
    "FORMATS",
    "LIGHTGBM_C_API",
    "LIGHTGBM_ONE_ROW",
    "NATIVE",
    "BoosterAnswers",
    "BoosterError",
    "BoosterInfo",
    "BoosterModel",
    "Family",
    "Format",
    "NativeEstimator",
    "Task",
    "describe",
    "family_of",
    "format_of",
    "inspect_native",
    "library_version",
    "native_bytes",
    "probe_native",
    "read_native",
    "set_threads",
    "wrapped_booster",
    "wrapper_iteration_range",
]

log = logging.getLogger("model_store.boosters")

Family = Literal["sklearn", "xgboost", "lightgbm"]
Format = Literal["joblib", "json", "ubj", "txt"]
Task = Literal["classification", "regression"]
FAMILIES: tuple[Family, ...] = ("sklearn", "xgboost", "lightgbm")
FORMATS: tuple[Format, ...] = ("joblib", "json", "ubj", "txt")
NATIVE: dict[str, Family] = {"json": "xgboost", "ubj": "xgboost", "txt": "lightgbm"}
"""Native formats and their family."""
ARTIFACTS: dict[str, str] = {"json": "booster.json", "ubj": "booster.ubj", "txt": "booster.txt"}
"""The artifact's name in a version directory, per native format (``model.json`` is the
manifest)."""
DEFAULT_THREADS = 1
LIGHTGBM_C_API = "LGBM_BoosterPredictForMat"
"""``BoosterModel.via`` of a LightGBM booster served through the library's C API."""
LIGHTGBM_ONE_ROW = "LGBM_BoosterPredictForMatSingleRowFast"
"""``BoosterModel.one_row`` of such a booster: the C API's single-row predictor, prepared
once, that answers a lone row."""

_SUFFIXES: dict[str, Format] = {".json": "json", ".ubj": "ubj", ".txt": "txt"}
_XGB_REGRESSION = ("reg:", "count:poisson")
_LGB_REGRESSION = frozenset({"regression", "regression_l1", "huber", "fair", "poisson",
                             "quantile", "mape", "gamma", "tweedie", "cross_entropy",
                             "cross_entropy_lambda"})
_LGB_ALIASES = {"regression_l2": "regression", "l2": "regression", "mse": "regression",
                "mean_squared_error": "regression", "rmse": "regression",
                "root_mean_squared_error": "regression", "l1": "regression_l1",
                "mae": "regression_l1", "mean_absolute_error": "regression_l1",
                "xentropy": "cross_entropy", "xentlambda": "cross_entropy_lambda",
                "softmax": "multiclass"}
_XGB_SERVED = "binary:logistic, multi:softprob, multi:softmax, reg:*, count:poisson"
_LGB_SERVED = "binary, multiclass and the regression objectives"


class BoosterError(ValueError):
    """Not a usable model of its family: not one at all, damaged, an objective that is not
    served, or one the installed library cannot load. The message is one line."""


def _xgboost() -> Any:
    try:
        import xgboost
    except ImportError as exc:
        raise BoosterError("xgboost is not installed (pip install "
                           "'inference-gateway[xgboost]')") from exc
    return xgboost


_lightgbm_logger_set = False


def _lightgbm() -> Any:
    global _lightgbm_logger_set
    try:
        import lightgbm
    except ImportError as exc:
        raise BoosterError("lightgbm is not installed (pip install "
                           "'inference-gateway[lightgbm]')") from exc
    if not _lightgbm_logger_set:  # its native messages go to logging, not print()
        lightgbm.register_logger(logging.getLogger("lightgbm"))
        _lightgbm_logger_set = True
    return lightgbm


def library_version(family: Family) -> str:
    """The installed version of ``family``'s library."""
    module = _xgboost() if family == "xgboost" else _lightgbm()
    return str(module.__version__)


def _library_error(exc: BaseException) -> str:
    """The first line of a library error, without XGBoost's ``[time] file:line:`` prefix."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first)[:300]


# -- what a model is -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BoosterInfo:
    """What a booster says about itself."""

    family: Family
    objective: str
    """As the library names it: ``binary:logistic``, ``multiclass``, ``reg:squarederror``..."""
    task: Task
    n_features: int
    n_classes: int  # 0 for a regressor
    feature_names: tuple[str, ...] | None  # None: none (LightGBM's Column_<i> count as none)
    splits: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(repr=False)
    """(feature index, threshold) arrays of the numeric splits of each tree."""
    categorical: bool = False
    """Has categorical splits (LightGBM), which generated rows do not exercise."""

    def default_classes(self) -> tuple[int, ...]:
        """The labels a native booster answers with unless named: 0..k-1."""
        return tuple(range(self.n_classes))


def format_of(path: Path) -> Format:
    """The format a file's suffix names: ``.json``, ``.ubj``, ``.txt``; joblib otherwise."""
    return _SUFFIXES.get(path.suffix.lower(), "joblib")


def family_of(model: Any) -> Family:
    """``xgboost`` or ``lightgbm`` for their scikit-learn wrappers and boosters, else
    ``sklearn``. Imports neither library: an object of theirs means it is imported."""
    module = type(model).__module__.partition(".")[0]
    if module == "xgboost":
        return "xgboost"
    if module == "lightgbm":
        return "lightgbm"
    return "sklearn"


def _is_booster(model: Any, family: Family) -> bool:
    if family == "xgboost":
        return isinstance(model, _xgboost().Booster)
    if family == "lightgbm":
        return isinstance(model, _lightgbm().Booster)
    return False


def wrapped_booster(estimator: Any, family: Family) -> Any:
    """The booster inside a fitted scikit-learn wrapper. Raises BoosterError."""
    if family == "xgboost":
        if not isinstance(estimator, _xgboost().XGBModel):
            raise BoosterError(f"an object of type {type(estimator).__name__} is not an "
                               "XGBoost model")
        getter = estimator.get_booster
    elif family == "lightgbm":
        if not isinstance(estimator, _lightgbm().LGBMModel):
            raise BoosterError(f"an object of type {type(estimator).__name__} is not a "
                               "LightGBM model")
        getter = lambda: estimator.booster_  # noqa: E731
    else:
        raise BoosterError(f"{family} models have no booster")
    try:
        return getter()
    except (AttributeError, ValueError) as exc:  # NotFittedError, LGBMNotFittedError
        raise BoosterError(f"{type(estimator).__name__} is not fitted") from exc


def native_bytes(model: Any) -> tuple[bytes, Format] | None:
    """A booster object's native file (XGBoost: UBJSON, LightGBM: text); None for anything
    that is not a booster."""
    family = family_of(model)
    if not _is_booster(model, family):
        return None
    if family == "xgboost":
        return bytes(model.save_raw("ubj")), "ubj"
    return model.model_to_string().encode(), "txt"


def describe(booster: Any, family: Family) -> BoosterInfo:
    """What an in-memory booster is (from its own JSON or text dump). Raises BoosterError
    for an objective or a model that is not served."""
    if family == "xgboost":
        return _xgboost_info(json.loads(bytes(booster.save_raw("json"))))
    text = booster.model_to_string()
    header, trees = _lightgbm_text(text)
    return _lightgbm_info(header, trees)


def inspect_native(data: bytes, fmt: Format) -> BoosterInfo:
    """What ``data`` is as a model file of ``fmt``, checked as the module docstring says,
    without loading it with its library (nothing here can crash the process).

    Raises:
        BoosterError: not a model file of that format, damaged, or not served.
    """
    if fmt in ("json", "ubj"):
        return _xgboost_info(_json_doc(data) if fmt == "json" else _ubj_doc(data))
    if fmt == "txt":
        header, trees = _lightgbm_text(_text(data))
        return _lightgbm_info(header, trees)
    raise BoosterError(f"{fmt} is not a native booster format")


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BoosterError("not a LightGBM text model (not UTF-8 text)") from None


def read_native(data: bytes, fmt: Format) -> tuple[Any, BoosterInfo]:
    """Check ``data`` as a model file of ``fmt`` (``inspect_native``), then load it with its
    library. Returns the booster and what it is. A file from outside is loaded in a child
    process first (``probe``): the checks refuse truncated and inconsistent files, not every
    corruption that crashes the library.

    Raises:
        BoosterError: not a model file of that format, damaged, not served, or the installed
            library cannot load it (the message says which).
    """
    info = inspect_native(data, fmt)
    if fmt in ("json", "ubj"):
        xgb = _xgboost()
        try:
            booster = xgb.Booster()
            booster.load_model(bytearray(data))
        except xgb.core.XGBoostError as exc:
            raise BoosterError(f"xgboost {xgb.__version__} cannot load it: "
                               f"{_library_error(exc)}") from exc
        if booster.num_features() != info.n_features:
            raise BoosterError(f"xgboost {xgb.__version__} reads {booster.num_features()} "
                               f"features, the file says {info.n_features}")
        return booster, info
    if fmt == "txt":
        lgb = _lightgbm()
        try:
            booster = lgb.Booster(model_str=_text(data))
        except lgb.basic.LightGBMError as exc:
            raise BoosterError(f"lightgbm {lgb.__version__} cannot load it: "
                               f"{_library_error(exc)}") from exc
        if booster.num_feature() != info.n_features:
            raise BoosterError(f"lightgbm {lgb.__version__} reads {booster.num_feature()} "
                               f"features, the file says {info.n_features}")
        return booster, info
    raise BoosterError(f"{fmt} is not a native booster format")


# -- XGBoost: the JSON / UBJSON document -----------------------------------------------------------
def _json_doc(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BoosterError(f"not an XGBoost JSON model (not JSON: {exc})") from None
    return _learner_doc(doc, "JSON")


def _learner_doc(doc: Any, what: str) -> dict[str, Any]:
    if not (isinstance(doc, dict) and isinstance(doc.get("learner"), dict)
            and "version" in doc):
        raise BoosterError(f"not an XGBoost {what} model (no learner and version)")
    return doc


_UBJ_NUMBERS: dict[bytes, str] = {b"i": ">i1", b"U": ">u1", b"I": ">i2", b"l": ">i4",
                                  b"L": ">i8", b"d": ">f4", b"D": ">f8"}


class _Ubj:
    """A strict reader of the UBJSON XGBoost writes: every length is checked against what is
    left, so a truncated or damaged file raises BoosterError instead of reaching the library."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise BoosterError(f"not a complete XGBoost UBJSON model (ends inside a value at "
                               f"byte {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def marker(self) -> bytes:
        m = self.take(1)
        while m == b"N":  # no-op
            m = self.take(1)
        return m

    def number(self, m: bytes) -> int | float:
        dtype = _UBJ_NUMBERS.get(m)
        if dtype is None:
            raise BoosterError(f"not an XGBoost UBJSON model (unknown marker {m!r} at byte "
                               f"{self.pos - 1})")
        size = np.dtype(dtype).itemsize
        value = np.frombuffer(self.take(size), dtype=dtype)[0]
        return value.item()  # type: ignore[no-any-return]

    def count(self) -> int:
        n = self.number(self.marker())
        if not isinstance(n, int) or n < 0 or n > len(self.data) - self.pos:
            raise BoosterError(f"not a complete XGBoost UBJSON model (length {n} at byte "
                               f"{self.pos})")
        return n

    def string(self) -> str:
        raw = self.take(self.count())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BoosterError("not an XGBoost UBJSON model (a string is not UTF-8)") from None

    def value(self, m: bytes, depth: int = 0) -> Any:
        if depth > 64:
            raise BoosterError("not an XGBoost UBJSON model (nested too deep)")
        if m in _UBJ_NUMBERS:
            return self.number(m)
        if m == b"S" or m == b"H":
            return self.string()
        if m == b"C":
            return self.take(1).decode("latin-1")
        if m in (b"T", b"F", b"Z"):
            return {b"T": True, b"F": False, b"Z": None}[m]
        if m == b"[":
            return self.array(depth)
        if m == b"{":
            return self.object(depth)
        raise BoosterError(f"not an XGBoost UBJSON model (unknown marker {m!r} at byte "
                           f"{self.pos - 1})")

    def _container(self) -> tuple[bytes | None, int | None, bytes | None]:
        """Optional ``$type`` and ``#count``; returns (type, count, next marker)."""
        m = self.marker()
        typ = None
        if m == b"$":
            typ = self.marker()
            m = self.marker()
            if m != b"#":
                raise BoosterError("not an XGBoost UBJSON model (a typed container without "
                                   "a count)")
        if m == b"#":
            return typ, self.count(), None
        return None, None, m

    def array(self, depth: int) -> Any:
        typ, n, m = self._container()
        if n is not None:
            if typ is not None and typ in _UBJ_NUMBERS:
                dtype = np.dtype(_UBJ_NUMBERS[typ])
                return np.frombuffer(self.take(n * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(typ or self.marker(), depth + 1) for _ in range(n)]
        out = []
        while m != b"]":
            assert m is not None
            out.append(self.value(m, depth + 1))
            m = self.marker()
        return out

    def object(self, depth: int) -> dict[str, Any]:
        typ, n, m = self._container()
        out: dict[str, Any] = {}
        if n is not None:
            for _ in range(n):
                key = self.string()
                out[key] = self.value(typ or self.marker(), depth + 1)
            return out
        while m != b"}":
            assert m is not None
            self.pos -= 1  # the key's length marker
            key = self.string()
            out[key] = self.value(self.marker(), depth + 1)
            m = self.marker()
        return out


def _ubj_doc(data: bytes) -> dict[str, Any]:
    if data[:1] != b"{":
        raise BoosterError("not an XGBoost UBJSON model (does not start with an object)")
    reader = _Ubj(data)
    doc = reader.value(reader.marker())
    if reader.pos != len(data):
        raise BoosterError(f"not an XGBoost UBJSON model ({len(data) - reader.pos} bytes "
                           "after the document)")
    return _learner_doc(doc, "UBJSON")


def _int(value: Any, what: str) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise BoosterError(f"damaged XGBoost model ({what} is {value!r})") from None
    return out


def _xgboost_trees(gbm: dict[str, Any]) -> list[dict[str, Any]]:
    name = gbm.get("name")
    if name == "dart":
        gbm = gbm.get("gbtree", {})
        name = gbm.get("name")
    if name == "gblinear":
        return []
    if name != "gbtree":
        raise BoosterError(f"XGBoost booster {name!r} is not served (gbtree, dart, gblinear)")
    trees = gbm.get("model", {}).get("trees")
    if not isinstance(trees, list):
        raise BoosterError("damaged XGBoost model (no trees)")
    return trees


def _xgboost_info(doc: dict[str, Any]) -> BoosterInfo:
    learner = doc["learner"]
    try:
        params = learner["learner_model_param"]
        objective = str(learner["objective"]["name"])
        gbm = learner["gradient_booster"]
    except (KeyError, TypeError):
        raise BoosterError("damaged XGBoost model (no objective, parameters or booster)"
                           ) from None
    n_features = _int(params.get("num_feature"), "num_feature")
    num_class = _int(params.get("num_class", 0), "num_class")
    if _int(params.get("num_target", 1), "num_target") > 1:
        raise BoosterError("multi-output XGBoost models are not served")
    if objective == "binary:logistic":
        task: Task = "classification"
        n_classes = 2
    elif objective in ("multi:softprob", "multi:softmax"):
        task, n_classes = "classification", num_class
        if n_classes < 2:
            raise BoosterError(f"damaged XGBoost model ({objective} with num_class "
                               f"{num_class})")
    elif objective.startswith(_XGB_REGRESSION):
        task, n_classes = "regression", 0
    else:
        raise BoosterError(f"objective {objective} is not served (served: {_XGB_SERVED})")
    names = learner.get("feature_names") or None
    types = learner.get("feature_types") or []
    if "c" in types:
        raise BoosterError("XGBoost models with categorical features are not served yet")
    if names is not None and len(names) != n_features:
        raise BoosterError(f"damaged XGBoost model ({len(names)} feature names, "
                           f"{n_features} features)")
    splits = []
    for i, tree in enumerate(_xgboost_trees(gbm)):
        splits.append(_xgboost_tree(tree, i, n_features))
    return BoosterInfo("xgboost", objective, task, n_features, n_classes,
                       None if names is None else tuple(str(n) for n in names), splits)


_XGB_NODE_ARRAYS = ("base_weights", "default_left", "loss_changes", "parents", "split_type",
                    "sum_hessian")


def _xgboost_tree(tree: Any, i: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """One tree's (feature, threshold) splits, after checking what the library indexes."""
    try:
        n = _int(tree["tree_param"]["num_nodes"], "num_nodes")
        arrays = {k: np.asarray(tree[k]) for k in ("left_children", "right_children",
                                                    "split_indices", "split_conditions")}
        others = [np.asarray(tree[k]) for k in _XGB_NODE_ARRAYS if k in tree]
        own_id = tree.get("id", i)
    except (KeyError, TypeError, ValueError):
        raise BoosterError(f"damaged XGBoost model (tree {i} lacks its arrays)") from None
    if own_id != i:
        raise BoosterError(f"damaged XGBoost model (tree {i} says it is tree {own_id})")
    if n < 1 or any(a.shape != (n,) for a in [*arrays.values(), *others]):
        raise BoosterError(f"damaged XGBoost model (tree {i}: arrays of other lengths than its "
                           f"{n} nodes)")
    left, right = arrays["left_children"], arrays["right_children"]
    features = arrays["split_indices"]
    inner = left != -1
    if (np.any((left < -1) | (left >= n) | (right < -1) | (right >= n))
            or np.any((left == -1) != (right == -1))
            or np.any(features[inner] < 0) or np.any(features[inner] >= n_features)):
        raise BoosterError(f"damaged XGBoost model (tree {i}: child or feature index out of "
                           "range)")
    return features[inner].astype(np.int64), arrays["split_conditions"][inner].astype(
        np.float64)


# -- LightGBM: the text model ----------------------------------------------------------------------
def _lightgbm_text(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The header and the tree blocks of a LightGBM text model, checked (see the module
    docstring). Raises BoosterError."""
    if not text.startswith("tree\n"):
        raise BoosterError("not a LightGBM text model (it does not start with 'tree')")
    first = text.find("\nTree=")
    end = text.find("\nend of trees")
    if first < 0 or end < first:
        raise BoosterError("not a complete LightGBM text model (no trees, or no 'end of "
                           "trees')")
    _check_lightgbm_tail(text[end + 1:])
    header = dict(line.split("=", 1) for line in text[:first].splitlines()[1:] if "=" in line)
    sizes = header.get("tree_sizes")
    blocks: list[str]
    if sizes is not None:
        try:
            lengths = [int(s) for s in sizes.split()]
        except ValueError:
            raise BoosterError("damaged LightGBM text model (tree_sizes)") from None
        pos, blocks = first + 1, []
        for i, length in enumerate(lengths):
            block = text[pos:pos + length]
            if length <= 0 or pos + length > end + 1 or not block.startswith(f"Tree={i}\n"):
                raise BoosterError(f"not a complete LightGBM text model (tree {i} is not where "
                                   "tree_sizes puts it)")
            blocks.append(block)
            pos += length
    else:
        blocks = ["Tree=" + b for b in text[first + 1:end].split("Tree=")[1:]]
    trees = [dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
             for block in blocks]
    try:
        max_feature = int(header["max_feature_idx"])
        per_iteration = int(header.get("num_tree_per_iteration", "1"))
    except (KeyError, ValueError):
        raise BoosterError("damaged LightGBM text model (max_feature_idx)") from None
    if max_feature < 0 or per_iteration < 1 or len(trees) % per_iteration:
        raise BoosterError("damaged LightGBM text model (feature or tree counts)")
    for i, tree in enumerate(trees):
        _check_lightgbm_tree(tree, i, max_feature + 1)
    return header, trees


def _check_lightgbm_tail(tail: str) -> None:
    """What follows the trees is optional, but a parameters section must be whole: lightgbm
    4.7 crashes on one cut short."""
    start = tail.find("\nparameters:\n")
    if start < 0:
        return
    stop = tail.find("\nend of parameters", start)
    lines = tail[start + len("\nparameters:\n"):stop].splitlines()
    if stop < 0 or not all(line.startswith("[") and line.endswith("]") for line in lines):
        raise BoosterError("not a complete LightGBM text model (its parameters section is cut "
                           "short)")


_INT = r"[-+]?\d+"
_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan"
_INT_LIST = re.compile(rf"(?:{_INT})(?: (?:{_INT}))*")
_FLOAT_LIST = re.compile(rf"(?:{_FLOAT})(?: (?:{_FLOAT}))*")
# Per tree: field -> (integers?, length: "leaves", "inner" (leaves - 1), or 1); lightgbm 4.7
# parses trees on OpenMP threads, where a malformed field aborts the process.
_LGB_TREE_FIELDS: dict[str, tuple[bool, str]] = {
    "num_leaves": (True, "one"), "num_cat": (True, "one"), "shrinkage": (False, "one"),
    "is_linear": (True, "one"), "leaf_value": (False, "leaves"),
    "leaf_weight": (False, "leaves"), "leaf_count": (True, "leaves"),
    "split_feature": (True, "inner"), "split_gain": (False, "inner"),
    "threshold": (False, "inner"), "decision_type": (True, "inner"),
    "left_child": (True, "inner"), "right_child": (True, "inner"),
    "internal_value": (False, "inner"), "internal_weight": (False, "inner"),
    "internal_count": (True, "inner"),
}
_LGB_REQUIRED = ("num_leaves", "num_cat", "leaf_value")
_LGB_REQUIRED_INNER = ("split_feature", "threshold", "left_child", "right_child")


def _numbers(tree: dict[str, str], key: str, i: int, integers: bool,
             length: int | None) -> np.ndarray:
    """A field's space-separated numbers, as lightgbm reads them (strictly)."""
    text = tree[key]
    if not (_INT_LIST if integers else _FLOAT_LIST).fullmatch(text) or (
            length is not None and text.count(" ") + 1 != length):
        raise BoosterError(f"damaged LightGBM text model (tree {i}: {key})")
    return np.array(text.split(" "), dtype=np.int64 if integers else np.float64)


def _check_lightgbm_tree(tree: dict[str, str], i: int, n_features: int) -> None:
    if any(k not in tree for k in _LGB_REQUIRED):
        raise BoosterError(f"damaged LightGBM text model (tree {i}: no "
                           f"{', '.join(k for k in _LGB_REQUIRED if k not in tree)})")
    leaves = int(_numbers(tree, "num_leaves", i, True, 1)[0])
    n_cat = int(_numbers(tree, "num_cat", i, True, 1)[0])
    if leaves < 1 or n_cat < 0 or leaves > 1 << 24:
        raise BoosterError(f"damaged LightGBM text model (tree {i}: {leaves} leaves)")
    if leaves > 1 and any(k not in tree for k in _LGB_REQUIRED_INNER):
        raise BoosterError(f"damaged LightGBM text model (tree {i}: a split array is missing)")
    sizes = {"one": 1, "leaves": leaves, "inner": leaves - 1}
    arrays = {key: _numbers(tree, key, i, integers, sizes[size])
              for key, (integers, size) in _LGB_TREE_FIELDS.items()
              if key in tree and (leaves > 1 or size != "inner")}
    if leaves == 1:
        return
    children = np.concatenate([arrays["left_child"], arrays["right_child"]])
    features = arrays["split_feature"]
    if (np.any(children >= leaves - 1) or np.any(children < -leaves)
            or np.any(features < 0) or np.any(features >= n_features)):
        raise BoosterError(f"damaged LightGBM text model (tree {i}: child or feature index "
                           "out of range)")
    if n_cat:
        if "cat_boundaries" not in tree or "cat_threshold" not in tree:
            raise BoosterError(f"damaged LightGBM text model (tree {i}: categorical splits)")
        bounds = _numbers(tree, "cat_boundaries", i, True, n_cat + 1)
        cats = _numbers(tree, "cat_threshold", i, True, None)
        if bounds[0] != 0 or np.any(np.diff(bounds) < 0) or bounds[-1] != len(cats):
            raise BoosterError(f"damaged LightGBM text model (tree {i}: categorical splits)")
    if arrays.get("is_linear", np.zeros(1))[0] != 0:
        raise BoosterError("LightGBM linear trees are not served yet")


def _lightgbm_info(header: dict[str, str], trees: list[dict[str, str]]) -> BoosterInfo:
    words = header.get("objective", "").split()
    if not words:
        raise BoosterError("a LightGBM model without an objective (a custom objective) is not "
                           "served: its outputs are raw scores")
    objective = _LGB_ALIASES.get(words[0], words[0])
    n_features = int(header["max_feature_idx"]) + 1
    num_class = int(header.get("num_class", "1"))
    if objective == "binary":
        task: Task = "classification"
        n_classes = 2
    elif objective == "multiclass":
        task, n_classes = "classification", num_class
        if n_classes < 2 or int(header.get("num_tree_per_iteration", "1")) != num_class:
            raise BoosterError(f"damaged LightGBM text model (multiclass with num_class "
                               f"{num_class})")
    elif objective in _LGB_REGRESSION:
        task, n_classes = "regression", 0
    else:
        raise BoosterError(f"objective {objective} is not served (served: {_LGB_SERVED})")
    names = tuple(header.get("feature_names", "").split())
    if len(names) != n_features:
        raise BoosterError(f"damaged LightGBM text model ({len(names)} feature names, "
                           f"{n_features} features)")
    generated = names == tuple(f"Column_{i}" for i in range(n_features))
    splits = []
    categorical = False
    for tree in trees:
        if int(tree["num_leaves"]) < 2:
            continue
        features = np.array(tree["split_feature"].split(), dtype=np.int64)
        thresholds = np.array(tree["threshold"].split(), dtype=np.float64)
        numeric = (np.array(tree["decision_type"].split(), dtype=np.int64) & 1) == 0
        categorical = categorical or not bool(np.all(numeric))
        splits.append((features[numeric], thresholds[numeric]))
    return BoosterInfo("lightgbm", " ".join(words), task, n_features, n_classes,
                       None if generated else names, splits, categorical)


# -- serving ---------------------------------------------------------------------------------------
class BoosterAnswers:
    """Labels and probabilities in the scikit-learn wrappers' shapes, from a booster's *raw*
    output: what the library's predict returns (binary: P(class 1); multi-class:
    probabilities, or margins for ``multi:softmax``; regression: values). Subclasses give
    ``_raw``: the library itself (``BoosterModel``), or a compiled candidate
    (``model_store.booster_compiled``), so every backend's answers are shaped by this one
    code."""

    def __init__(self, info: BoosterInfo, classes: Iterable[Any] | None) -> None:
        self.family = info.family
        self.info = info
        self._classes = None if classes is None else np.asarray(list(classes))
        self._softmax = info.objective == "multi:softmax"
        self._binary = info.task == "classification" and info.n_classes == 2

    def _raw(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _proba_of(self, raw: np.ndarray) -> np.ndarray:
        if self._softmax:  # scipy.special.softmax, as XGBClassifier.predict_proba calls it
            shifted = np.exp(raw - np.amax(raw, axis=1, keepdims=True))
            raw = shifted / np.sum(shifted, axis=1, keepdims=True)
        elif self._binary:  # (1 - p, p) in the library's dtype, as the wrappers
            p = raw.reshape(-1)
            raw = np.empty((len(p), 2), dtype=p.dtype)
            np.subtract(1, p, out=raw[:, 0])
            raw[:, 1] = p
        return np.asarray(raw, dtype=np.float64)

    def run(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (or values) and, for classifiers, probabilities (float64): one call."""
        raw = self._raw(rows)
        if self.info.task == "regression":
            return raw.reshape(len(rows)).astype(np.float64), None
        proba = self._proba_of(raw)
        assert self._classes is not None
        labels: np.ndarray = self._classes.take(np.argmax(proba, axis=1))
        return labels, proba

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return self.run(rows)[0]

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        proba = self.run(rows)[1]
        if proba is None:
            raise BoosterError("a regressor has no probabilities")
        return proba


class BoosterModel(BoosterAnswers):
    """The library's own answers in the scikit-learn wrappers' shapes: see the module docstring.

    ``reference`` runs the library's own predict instead of the fast path (XGBoost: a
    ``DMatrix`` and ``Booster.predict``; LightGBM: ``Booster.predict`` with its default
    threads): what a native booster is verified against, and what
    ``GATEWAY_BACKEND=estimator`` serves. Thread-safe once built (XGBoost's
    ``inplace_predict`` and LightGBM's ``predict`` are).

    The fast path of a LightGBM booster is its C API's predict (``_LightGBMCall``) where the
    library is found, else ``Booster.predict``. The ``via`` argument names the one to take as
    registration recorded and verified it (the store passes the manifest's), None for the best
    this process has; the ``via`` property says which serves.
    """

    def __init__(self, booster: Any, info: BoosterInfo, classes: Iterable[Any] | None, *,
                 threads: int = DEFAULT_THREADS,
                 iteration_range: tuple[int, int] = (0, 0), reference: bool = False,
                 via: str | None = None, one_row: bool = True) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        super().__init__(info, classes)
        self.threads = threads
        self.reference = reference
        self.booster = booster
        self.iteration_range = iteration_range
        self._lgb_call: _LightGBMCall | None = None
        if self.family == "xgboost":
            self._xgb = _xgboost()
            if not reference:
                booster.set_param({"nthread": threads})
        else:
            self._predict_kwargs: dict[str, Any] = {} if reference else {"num_threads": threads}
            self._lgb_call = (None if reference or via not in (None, LIGHTGBM_C_API)
                              else _LightGBMCall.of(booster, threads, one_row=one_row))

    @property
    def via(self) -> str:
        """The library call, for the manifest."""
        if self.family == "xgboost":
            return "Booster.predict(DMatrix)" if self.reference else "Booster.inplace_predict"
        return "Booster.predict" if self._lgb_call is None else LIGHTGBM_C_API

    @property
    def one_row(self) -> str | None:
        """The library call a lone row goes through instead of ``via`` (LightGBM's
        single-row predictor), or None: every call goes through ``via``."""
        call = self._lgb_call
        return LIGHTGBM_ONE_ROW if call is not None and call.one_row else None

    def _raw(self, rows: np.ndarray) -> np.ndarray:
        b = self.booster
        if self.family == "xgboost":
            if self.reference:
                dm = self._xgb.DMatrix(rows, feature_names=b.feature_names)
                out = b.predict(dm, output_margin=self._softmax,
                                iteration_range=self.iteration_range)
            else:
                out = b.inplace_predict(rows, predict_type="margin" if self._softmax else "value",
                                        iteration_range=self.iteration_range,
                                        validate_features=False)
            return np.asarray(out)
        if self._lgb_call is not None:
            return self._lgb_call(rows)
        return np.asarray(b.predict(rows, **self._predict_kwargs))


class _LightGBMCall:
    """A LightGBM booster's predictions in one foreign call: ``LGBM_BoosterPredictForMat``,
    the C function ``Booster.predict`` ends in, with the same arguments (normal output, trees up
    to ``best_iteration``, ``num_threads``). ``Booster.predict`` around it builds a predictor
    and makes three more foreign calls per model call; each gives up the GIL and must take it
    back from the event loop, and a lone row pays ~30 µs of Python. With ``one_row``, a lone
    row goes through ``LGBM_BoosterPredictForMatSingleRowFast`` instead, on a predictor prepared
    once with the same arguments (``LGBM_BoosterPredictForMat`` parses its parameters and builds
    a predictor at every call: a quarter of a lone row's time); LightGBM serializes calls on it.
    The booster is loaded into the library a second time, from its model text: a handle of this
    object's own (public C API only), freed with it. Thread-safe, as LightGBM's predict is."""

    def __init__(self, lib: ctypes.CDLL, booster: Any, threads: int, *,
                 one_row: bool = True) -> None:
        self._lib = lib
        handle, iterations = ctypes.c_void_p(), ctypes.c_int()
        text = booster.model_to_string().encode()
        self._check(lib.LGBM_BoosterLoadModelFromString(
            ctypes.c_char_p(text), ctypes.byref(iterations), ctypes.byref(handle)))
        self._handle = handle
        self._frees = [(lib.LGBM_BoosterFree, handle)]  # freed last to first
        weakref.finalize(self, _free_all, self._frees)
        classes = ctypes.c_int()
        self._check(lib.LGBM_BoosterGetNumClasses(handle, ctypes.byref(classes)))
        self._per_row = classes.value
        self._features = int(booster.num_feature())
        self._iterations = ctypes.c_int(int(booster.best_iteration))
        self._params = ctypes.c_char_p(f"num_threads={threads}".encode())
        self._predict = lib.LGBM_BoosterPredictForMat
        self._one = self._one_row_predictor() if one_row else None

    def _one_row_predictor(self) -> ctypes.c_void_p | None:
        """The library's single-row predictor for this booster (a ``FastConfigHandle``), or
        None where the library has none or refuses to prepare one."""
        lib = self._lib
        try:
            init, free = lib.LGBM_BoosterPredictForMatSingleRowFastInit, lib.LGBM_FastConfigFree
            self._predict_one = lib.LGBM_BoosterPredictForMatSingleRowFast
        except AttributeError:
            return None
        one = ctypes.c_void_p()
        if init(self._handle, _PREDICT_NORMAL, _FROM_FIRST_TREE, self._iterations,
                _C_API_FLOAT64, ctypes.c_int32(self._features), self._params,
                ctypes.byref(one)) != 0:
            log.warning("LightGBM refused a single-row predictor (%s): lone rows go through "
                        "%s", lib.LGBM_GetLastError().decode(), LIGHTGBM_C_API)
            return None
        self._frees.append((free, one))
        return one

    @property
    def one_row(self) -> bool:
        """Does a lone row go through the single-row predictor?"""
        return self._one is not None

    @classmethod
    def of(cls, booster: Any, threads: int, *, one_row: bool = True) -> _LightGBMCall | None:
        """The call for ``booster``, or None where the library's C API is not found (then
        ``Booster.predict`` serves)."""
        lib = _lightgbm_c_api()
        if lib is None:
            return None
        try:
            return cls(lib, booster, threads, one_row=one_row)
        except (BoosterError, AttributeError, OSError) as exc:
            log.warning("LightGBM's C API refused the booster (%s): Booster.predict serves", exc)
            return None

    def _check(self, status: int) -> None:
        if status != 0:
            raise BoosterError(f"lightgbm: {self._lib.LGBM_GetLastError().decode()}")

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Booster.predict's output for ``rows`` (float64): one value per row, or a row of
        ``num_class`` probabilities per row. Raises BoosterError."""
        rows = np.ascontiguousarray(rows, dtype=np.float64)
        n, features = rows.shape
        out = np.empty(n * self._per_row, dtype=np.float64)
        got = ctypes.c_int64()
        if n == 1 and self._one is not None and features == self._features:
            self._check(self._predict_one(self._one, ctypes.c_void_p(rows.ctypes.data),
                                          ctypes.byref(got), ctypes.c_void_p(out.ctypes.data)))
        else:
            self._check(self._predict(
                self._handle, ctypes.c_void_p(rows.ctypes.data), _C_API_FLOAT64,
                ctypes.c_int32(n), ctypes.c_int32(features), _ROW_MAJOR, _PREDICT_NORMAL,
                _FROM_FIRST_TREE, self._iterations, self._params, ctypes.byref(got),
                ctypes.c_void_p(out.ctypes.data)))
        if got.value != len(out):
            raise BoosterError(f"lightgbm: {got.value} predictions for {len(out)}")
        return out if self._per_row == 1 else out.reshape(n, self._per_row)


def _free_all(frees: list[tuple[Any, ctypes.c_void_p]]) -> None:
    for free, handle in reversed(frees):
        free(handle)


_C_API_FLOAT64 = ctypes.c_int(1)  # C_API_DTYPE_FLOAT64 in LightGBM's c_api.h
_ROW_MAJOR = ctypes.c_int(1)
_PREDICT_NORMAL = ctypes.c_int(0)  # C_API_PREDICT_NORMAL
_FROM_FIRST_TREE = ctypes.c_int(0)


@functools.cache
def _lightgbm_c_api() -> ctypes.CDLL | None:
    """The shared library of the installed ``lightgbm`` package (loaded once per process: the
    one the package itself uses), or None if it is not where the package keeps it."""
    package = Path(_lightgbm().__file__).parent
    for path in sorted((package / "lib").glob("lib_lightgbm.*")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        lib.LGBM_GetLastError.restype = ctypes.c_char_p
        return lib
    log.warning("LightGBM's shared library is not under %s: Booster.predict serves", package)
    return None


def probe_native(path: str, format: str, rows: int = 2_000) -> dict[str, Any]:
    """A child process's task (``model_store.child``): load the booster file at ``path`` as
    ``format`` with its library and predict ``rows`` rows spanning its split thresholds through
    each library call the store makes, so that a file that crashes the library crashes the
    child, not the caller. Returns what the file is (``n_features``, ``n_classes``,
    ``objective``). Raises BoosterError."""
    from model_store.compiled import verification_rows

    if format not in NATIVE:
        raise BoosterError(f"{format} is not a native booster format")
    booster, info = read_native(Path(path).read_bytes(), format)  # type: ignore[arg-type]
    x = verification_rows(None, info.n_features, generated=rows, splits=info.splits)
    classes = info.default_classes() or None
    for reference in (True, False):
        BoosterModel(booster, info, classes, reference=reference).run(x)
    return {"n_features": info.n_features, "n_classes": info.n_classes,
            "objective": info.objective}


class NativeEstimator:
    """A native booster with a scikit-learn face: ``predict``, ``predict_proba`` (classifiers),
    ``classes_`` (classifiers only), ``n_features_in_``, all from the library's own predict
    (``BoosterModel(reference=True)``)."""

    def __init__(self, booster: Any, info: BoosterInfo, classes: Iterable[Any] | None, *,
                 threads: int = DEFAULT_THREADS) -> None:
        self.booster = booster
        self.info = info
        self.n_features_in_ = info.n_features
        if info.task == "classification":
            assert classes is not None
            self.classes_ = np.asarray(list(classes))
        self._model = BoosterModel(booster, info, classes, reference=True)
        set_threads(self, info.family, threads)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return self._model.predict(rows)

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        return self._model.predict_proba(rows)


def set_threads(estimator: Any, family: Family, threads: int) -> None:
    """Make ``estimator``'s own predict (a wrapper's, or ``NativeEstimator``'s) use
    ``threads`` threads."""
    if isinstance(estimator, NativeEstimator):
        if family == "xgboost":
            estimator.booster.set_param({"nthread": threads})
        else:
            estimator._model._predict_kwargs = {"num_threads": threads}
        return
    if family in ("xgboost", "lightgbm"):
        estimator.set_params(n_jobs=threads)
        if family == "xgboost":
            estimator.get_booster().set_param({"nthread": threads})


def wrapper_iteration_range(estimator: Any) -> tuple[int, int]:
    """The trees an XGBoost wrapper predicts with: up to ``best_iteration`` after early
    stopping, else all (``(0, 0)``), as ``XGBModel.predict`` decides."""
    if getattr(estimator, "booster", None) == "gblinear":
        return (0, 0)
    try:
        return (0, int(estimator.best_iteration) + 1)
    except AttributeError:
        return (0, 0)

