"""Versioned model store on disk.

Layout: ``<root>/<name>/<version>/`` holds the artifact and the manifest ``model.json``. The
artifact is ``model.joblib`` (a pickled estimator: scikit-learn, or an XGBoost or LightGBM
wrapper) or a native booster file (``booster.json``, ``booster.ubj``, ``booster.txt``; see
``model_store.boosters``), which is loaded without unpickling. Beside it, the compiled model
that serves some output: ``model.onnx`` (scikit-learn), or an XGBoost or LightGBM model's
chosen candidate, ``compiled-<sha256 prefix>.onnx`` or ``.so`` (a TL2cgen shared library; see
``model_store.booster_compiled``), each recorded with its sha256 and checked before it loads.
Versions are positive integers; ``latest`` is the highest. Loading checks the artifact's
sha256 against the manifest *before* unpickling or loading it, then checks that what was loaded
is a model that fits the manifest, so a tampered, mismatched or foreign artifact is never
served. Error messages name the model,
the version and the reason, never a file path (they reach ``/readyz``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import platform
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import anyio
import joblib
import numpy as np
import sklearn

from model_store import booster_compiled, boosters, child
from model_store.boosters import (
    ARTIFACTS,
    FAMILIES,
    FORMATS,
    BoosterError,
    BoosterInfo,
    BoosterModel,
    Family,
    Format,
    NativeEstimator,
)
from model_store.compiled import (
    ONNX_ARTIFACT,
    CompileError,
    Expected,
    OnnxModel,
    Runs,
    compile_estimator,
    compiled_library_versions,
    labels_from_proba,
    sklearn_checks,
    verification_rows,
    verify_backend,
)
from model_store.feature_names import drop_fitted_feature_names, fitted_feature_names
from model_store.forest import ForestProba, forest_proba
from model_store.settings import ModelSettings

ARTIFACT = "model.joblib"
MANIFEST = "model.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

log = logging.getLogger("model_store")

Task = boosters.Task
Loader = Callable[[Path], Any]

# What unpickling a foreign or damaged artifact can raise.
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ImportError, AttributeError, ValueError,
                    TypeError, KeyError, IndexError, OSError)


def _where(name: str, version: int | str) -> str:
    return f"model {name!r} v{version}"


class ModelStoreError(Exception):
    """A model, version or artifact is missing or cannot be trusted."""


class ModelNotFound(ModelStoreError):
    """No such model name, or no such version of it."""


class ArtifactRejected(ModelStoreError):
    """The files exist but were refused: missing manifest, digest mismatch, not an estimator,
    shape mismatch."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What is known about one model version without unpickling it."""

    name: str
    version: int
    sha256: str
    features: tuple[str, ...]
    classes: tuple[str | int | float, ...]
    task: Task
    created: str
    library_versions: dict[str, str]
    artifact: str = ARTIFACT
    backends: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What verification found per backend: ``{"onnx": {"artifact", "sha256", "input",
    "round_input", "checks": {output: {...}}, "tried": {...}, ...}}`` or ``{"onnx": {"error":
    "<why it could not be compiled>"}}``; ``{"sklearn": {"checks": {"label": {"from_proba":
    bool, "rows": n}}}}`` for the estimator itself. A booster model: ``{family: {"reference",
    "via", "checks"}}`` (its fast path; ``"one_row"``: the call a lone row goes through, found
    to answer rows alone exactly as ``via`` answers them in a block), and per candidate tried
    (``onnx``, ``treelite``) its ``checks``, build record and, when chosen, ``artifact`` and
    ``sha256``; or its ``error``."""
    settings: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    """Serving settings of this version (only the fields set; the rest are global)."""
    family: Family = "sklearn"
    """The library the model belongs to: ``sklearn``, ``xgboost`` or ``lightgbm``."""
    format: Format = "joblib"
    """How the artifact is stored: ``joblib`` (pickled), or natively ``json``/``ubj``
    (XGBoost) or ``txt`` (LightGBM)."""
    objective: str = ""
    """A booster's objective as its library names it (empty for scikit-learn)."""
    choice: dict[str, Any] = dataclasses.field(default_factory=dict)
    """An XGBoost or LightGBM model's served backend per output, and why: ``{"outputs":
    {output: backend}, "rule", "threads", "measured": {backend: {"1"|"64": {"median_us",
    "min_us", "max_us"}}}, "refused": {candidate: reason}}`` (``model_store.booster_compiled``);
    empty when no candidate was tried."""

    @property
    def digest(self) -> str:
        """Short version digest used in cache keys: a new artifact gets a new digest."""
        return self.sha256[:16]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name, "version": self.version, "sha256": self.sha256,
            "features": list(self.features), "classes": list(self.classes), "task": self.task,
            "created": self.created, "library_versions": dict(self.library_versions),
            "artifact": self.artifact, "backends": self.backends,
            "family": self.family, "format": self.format,
        }
        if self.objective:
            data["objective"] = self.objective
        if self.choice:
            data["choice"] = self.choice
        if self.settings:
            data["settings"] = self.settings.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """Raises ValueError (or KeyError, TypeError) on a manifest that cannot be read."""
        family, fmt = data.get("family", "sklearn"), data.get("format", "joblib")
        if family not in FAMILIES or fmt not in FORMATS:
            raise ValueError(f"unknown family {family!r} or format {fmt!r}")
        if fmt != "joblib" and boosters.NATIVE[fmt] != family:
            raise ValueError(f"format {fmt!r} is not one of the {family} family")
        return cls(
            name=str(data["name"]),
            version=int(data["version"]),
            sha256=str(data["sha256"]),
            features=tuple(str(f) for f in data["features"]),
            classes=tuple(data.get("classes") or ()),
            task=data.get("task", "classification"),
            created=str(data["created"]),
            library_versions=dict(data.get("library_versions") or {}),
            artifact=str(data.get("artifact", ARTIFACT)),
            backends=dict(data.get("backends") or {}),
            settings=ModelSettings.from_json(data.get("settings")),
            family=family,
            format=fmt,
            objective=str(data.get("objective", "")),
            choice=dict(data.get("choice") or {}),
        )

    def verified(self, backend: str, output: str) -> bool:
        """Was ``backend`` verified against the estimator for ``output``?"""
        checks = self.backends.get(backend, {}).get("checks", {})
        return bool(checks.get(output, {}).get("verified", False))

    def via(self) -> str | None:
        """The library call a booster family's own path was verified through at
        registration (``backends.<family>.via``), or None."""
        via = self.backends.get(self.family, {}).get("via")
        return via if isinstance(via, str) else None

    def one_row(self) -> str | None:
        """The library call a lone row of a booster family goes through, checked at
        registration to answer as ``via`` does (``backends.<family>.one_row``), or None."""
        call = self.backends.get(self.family, {}).get("one_row")
        return call if isinstance(call, str) else None

    def chosen(self, output: str) -> str | None:
        """The compiled candidate chosen to serve ``output`` of a booster model (``onnx``,
        ``treelite``), or None (the model's own library)."""
        name = self.choice.get("outputs", {}).get(output)
        return None if name in (None, self.family) else str(name)

    def from_proba(self, backend: str) -> bool:
        """Do ``classes[argmax]`` of ``backend``'s probabilities equal the estimator's labels on
        every verification row (ties included)? False when not recorded."""
        checks = self.backends.get(backend, {}).get("checks", {})
        return checks.get("label", {}).get("from_proba") is True


Backend = Literal["sklearn", "onnx", "treelite", "xgboost", "lightgbm"]
"""Who answers an output: ``onnx`` or ``treelite`` (a compiled model), else the model's own
family."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified manifest with its estimator (and compiled model, if any), ready to predict.

    Each output is served by a compiled model only where the manifest records that it was
    verified for that output (scikit-learn: ``onnx``) or chosen for it (XGBoost and LightGBM:
    ``onnx`` or ``treelite``, in ``chosen``, loaded and verified again);
    ``prefer_compiled=False`` forces the model's own family. Within the family, a verified
    fast path answers where there is one: ``forest`` (scikit-learn forests' probabilities) or
    ``booster`` (XGBoost and LightGBM: one library call); without them
    (``dataclasses.replace(model, forest=None, booster=None)``) the estimator's own methods
    answer. Rows are float64, columns in ``manifest.features`` order.
    """

    manifest: Manifest
    estimator: Any
    compiled: OnnxModel | None = None
    forest: ForestProba | None = None  # the estimator's probabilities, its overhead spared
    booster: BoosterModel | None = None  # an XGBoost or LightGBM model's verified fast path
    chosen: Mapping[str, Runs] = dataclasses.field(default_factory=dict)
    """A booster model's compiled candidates that serve an output, by name (``onnx``,
    ``treelite``)."""
    _classes: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        classes = getattr(self.estimator, "classes_", None)
        object.__setattr__(self, "_classes",
                           np.asarray(self.manifest.classes if classes is None else classes))

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def has_proba(self) -> bool:
        return self.manifest.task == "classification" and hasattr(self.estimator, "predict_proba")

    @property
    def threads(self) -> int | None:
        """Threads inside one call of an XGBoost or LightGBM model (its ``threads`` setting,
        else 1); None for other families."""
        if self.manifest.family == "sklearn":
            return None
        return self.manifest.settings.threads or boosters.DEFAULT_THREADS

    def backend(self, output: str, *, prefer_compiled: bool = True) -> Backend:
        """Which backend answers ``output`` (``label`` or ``probabilities``)."""
        if prefer_compiled:
            if self.compiled is not None and self.manifest.verified("onnx", output):
                return "onnx"
            chosen = self.manifest.chosen(output)
            if chosen in self.chosen:
                return chosen  # type: ignore[return-value]
        return self.manifest.family

    def backends(self, *, prefer_compiled: bool = True) -> dict[str, Backend]:
        outputs = ["label", "probabilities"] if self.has_proba else ["label"]
        return {o: self.backend(o, prefer_compiled=prefer_compiled) for o in outputs}

    def _compiled(self, backend: Backend) -> Runs | None:
        """The compiled model answering as ``backend``, if it is one."""
        runs = self.chosen.get(backend)
        if runs is None and backend == "onnx":
            return self.compiled
        return runs

    def predict(self, rows: np.ndarray, *, prefer_compiled: bool = True) -> list[Any]:
        """Labels (or values) for ``rows`` as plain Python objects, in row order."""
        compiled = self._compiled(self.backend("label", prefer_compiled=prefer_compiled))
        if compiled is not None:
            values = compiled.run(rows)[0]
        elif self.booster is not None:
            values = self.booster.predict(rows)
        elif self.forest is not None:  # what the forest's own predict does with them
            values = labels_from_proba(self._classes, self.forest.predict_proba(rows))
        else:
            values = self.estimator.predict(rows)
        out: list[Any] = np.asarray(values).tolist()
        return out

    def predict_proba(self, rows: np.ndarray, *, prefer_compiled: bool = True
                      ) -> list[list[float]]:
        """Class probabilities for ``rows``, columns in ``manifest.classes`` order."""
        out: list[list[float]] = self._proba(
            rows, self.backend("probabilities", prefer_compiled=prefer_compiled)).tolist()
        return out

    def _proba(self, rows: np.ndarray, backend: Backend) -> np.ndarray:
        compiled = self._compiled(backend)
        if compiled is not None:
            proba = compiled.run(rows)[1]
            if proba is None:
                raise CompileError(f"{_where(self.name, self.version)}: the compiled model "
                                   "has no probabilities output")
            return proba
        if self.booster is not None:
            return self.booster.predict_proba(rows)
        if self.forest is not None:
            return self.forest.predict_proba(rows)
        return np.asarray(self.estimator.predict_proba(rows), dtype=np.float64)

    def both_in_one_call(self, *, prefer_compiled: bool = True) -> bool:
        """Does ``predict_both`` answer with one model call? Yes when both outputs come from the
        same compiled model (one run gives both), or when the probabilities' backend was
        verified to give the estimator's labels as ``classes[argmax]`` on every verification
        row."""
        if not self.has_proba:
            return False
        label = self.backend("label", prefer_compiled=prefer_compiled)
        proba = self.backend("probabilities", prefer_compiled=prefer_compiled)
        return (label == proba and self._compiled(label) is not None) or \
            self.manifest.from_proba(proba)

    def predict_both(self, rows: np.ndarray, *, prefer_compiled: bool = True
                     ) -> tuple[list[Any], list[list[float]]]:
        """Labels and probabilities (classifiers with probabilities only): the answers of
        ``predict`` and ``predict_proba``, with one model call where ``both_in_one_call``."""
        label = self.backend("label", prefer_compiled=prefer_compiled)
        proba_backend = self.backend("probabilities", prefer_compiled=prefer_compiled)
        compiled = self._compiled(label)
        if label == proba_backend and compiled is not None:
            labels, proba = compiled.run(rows)
            if proba is None:
                raise CompileError(f"{_where(self.name, self.version)}: the compiled model "
                                   "has no probabilities output")
        elif self.manifest.from_proba(proba_backend):
            proba = self._proba(rows, proba_backend)
            labels = labels_from_proba(self._classes, proba)
        else:
            return (self.predict(rows, prefer_compiled=prefer_compiled),
                    self.predict_proba(rows, prefer_compiled=prefer_compiled))
        return np.asarray(labels).tolist(), np.asarray(proba, dtype=np.float64).tolist()


class StoreChanges(NamedTuple):
    """What differs between two ``ModelStore.scan`` results, as ``(name, version)`` pairs."""

    added: list[tuple[str, int]]
    removed: list[tuple[str, int]]
    changed: list[tuple[str, int]]  # the manifest's bytes differ (new settings, recompiled)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions(family: Family = "sklearn") -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "sklearn": sklearn.__version__,
        "joblib": joblib.__version__,
        "numpy": np.__version__,
    }
    if family != "sklearn":
        out[family] = boosters.library_version(family)
    return out


def describe_estimator(estimator: Any) -> tuple[tuple[str, ...], tuple[Any, ...], Task]:
    """Feature names, classes and task type read from a fitted estimator. The feature names
    are those it was fitted with (``feature_names_in_``), else ``f0..fN``.

    Raises:
        ValueError: not an estimator (no ``predict``), or not fitted (no ``n_features_in_``).
    """
    if not callable(getattr(estimator, "predict", None)):
        raise ValueError(f"an object of type {type(estimator).__name__} is not an estimator "
                         "(no predict method)")
    n = getattr(estimator, "n_features_in_", None)
    if n is None:
        raise ValueError(f"{type(estimator).__name__} is not fitted (no n_features_in_)")
    names = fitted_feature_names(estimator)
    features = names if names is not None else tuple(f"f{i}" for i in range(int(n)))
    classes_ = getattr(estimator, "classes_", None)
    if classes_ is None:
        return features, (), "regression"
    return features, tuple(np.asarray(classes_).tolist()), "classification"


def _fast_forest(estimator: Any, n_features: int) -> ForestProba | None:
    """``forest_proba`` checked on 2,000 rows spread over the estimator's thresholds; None for
    anything it does not reproduce exactly (or cannot take)."""
    try:
        return forest_proba(estimator, verification_rows(estimator, n_features,
                                                          generated=2_000))
    except Exception:
        log.debug("no fast forest path for %s", type(estimator).__name__, exc_info=True)
        return None


def _check_estimator(manifest: Manifest, estimator: Any) -> None:
    """Refuse what was unpickled unless it is an estimator that fits ``manifest``."""
    where = _where(manifest.name, manifest.version)
    if not callable(getattr(estimator, "predict", None)):
        raise ArtifactRejected(f"{where}: the artifact holds an object of type "
                               f"{type(estimator).__name__}, not an estimator (no predict method)")
    n = getattr(estimator, "n_features_in_", None)
    if n is None:
        return  # a predict-style model that does not say; the gateway checks row widths
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or int(n) != len(
            manifest.features):
        raise ArtifactRejected(f"{where}: estimator expects {n!r} features, manifest lists "
                               f"{len(manifest.features)}")


def _booster_verified(manifest: Manifest) -> bool:
    """Was the booster path verified for every output the model has?"""
    outputs = ["label"] + (["probabilities"] if manifest.task == "classification" else [])
    return all(manifest.verified(manifest.family, o) for o in outputs)


def _wrapper_booster(manifest: Manifest, estimator: Any) -> BoosterModel | None:
    """The verified booster path of an unpickled XGBoost or LightGBM wrapper (None where
    registration did not verify it); the wrapper's own predict gets the version's threads
    too. Raises ArtifactRejected for a wrapper of another family or shape."""
    where = _where(manifest.name, manifest.version)
    family = manifest.family
    try:
        booster = boosters.wrapped_booster(estimator, family)
    except BoosterError as exc:
        raise ArtifactRejected(f"{where}: {manifest.artifact}: {exc}") from exc
    classes = getattr(estimator, "classes_", None)
    n_classes = 0 if classes is None else len(classes)
    if n_classes != len(manifest.classes):
        raise ArtifactRejected(f"{where}: the {family} model has {n_classes} classes, the "
                               f"manifest lists {len(manifest.classes)}")
    threads = manifest.settings.threads or boosters.DEFAULT_THREADS
    boosters.set_threads(estimator, family, threads)
    if not _booster_verified(manifest):
        return None
    info = BoosterInfo(family, manifest.objective, manifest.task, len(manifest.features),
                       n_classes, None, [])
    return BoosterModel(booster, info, classes, threads=threads,
                        iteration_range=boosters.wrapper_iteration_range(estimator),
                        via=manifest.via(), one_row=manifest.one_row() is not None)


def _check_rows(rows: np.ndarray | None, n_features: int) -> np.ndarray | None:
    if rows is None:
        return None
    out = np.asarray(rows, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] != n_features:
        raise ValueError(f"training rows: expected shape (n, {n_features}), got {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError("training rows: NaN or infinite values")
    return out


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A model about to be stored: what it is, what to write, what verifies it."""

    family: Family
    format: Format
    artifact: str
    data: bytes | None  # the native file; None: joblib-dump the model
    features: tuple[str, ...]
    classes: tuple[Any, ...]
    task: Task
    served: Any  # the estimator as load_sync serves it (the reference for a booster)
    info: BoosterInfo | None = None
    fast: BoosterModel | None = None  # a booster's fast path, verified against ``served``


def _features(given: Sequence[str] | None, own: tuple[str, ...] | None, n: int,
              what: str) -> tuple[str, ...]:
    if given is None:
        return own if own is not None else tuple(f"f{i}" for i in range(n))
    features = tuple(given)
    if len(features) != n:
        raise ValueError(f"{len(features)} feature names given, {what} expects {n}")
    if own is not None and features != own:
        raise ValueError(f"feature names {','.join(features)} disagree with those the "
                         f"{what} was fitted with: {','.join(own)}")
    return features


def _classes(given: Sequence[Any] | None, own: tuple[Any, ...], what: str) -> tuple[Any, ...]:
    if given is None or tuple(given) == own:
        return own
    raise ValueError(f"classes {','.join(map(str, given))} disagree with the {what}'s: "
                     f"{','.join(map(str, own)) or '(a regressor has none)'}")


def _prepare(model: Any, fmt: Format | None, features: Sequence[str] | None,
             classes: Sequence[Any] | None, threads: int, *, probe: bool = True) -> _Prepared:
    """What ``register`` stores for ``model`` (see there). A booster file (a path) is
    checked, then, with ``probe``, loaded and predicted with in a child process before this
    process loads it (``_probe``). Raises ValueError (BoosterError for a booster that is not
    usable), OSError."""
    data: bytes | None = None
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        fmt = fmt or boosters.format_of(path)
        if fmt == "joblib":
            raise ValueError(f"{path}: not a native booster file (.json, .ubj, .txt); "
                             "register the estimator it holds")
        data = path.read_bytes()
        if probe:
            _probe(data, fmt)
    else:
        native = boosters.native_bytes(model)
        if native is not None:
            data, fmt = native
    if data is not None:  # a native booster: loaded from the very bytes stored
        assert fmt is not None and fmt != "joblib"
        booster, info = boosters.read_native(data, fmt)
        own_classes = info.default_classes()
        if classes is not None:
            if info.task == "regression":
                raise ValueError(f"classes given for a regressor ({info.objective})")
            if len(classes) != info.n_classes or len(set(classes)) != len(classes):
                raise ValueError(f"{len(classes)} classes given, the {info.objective} model "
                                 f"has {info.n_classes} distinct ones")
            own_classes = tuple(classes)
        names = _features(features, info.feature_names, info.n_features, "booster")
        reference = NativeEstimator(booster, info, own_classes or None, threads=threads)
        fast = BoosterModel(booster, info, own_classes or None, threads=threads)
        return _Prepared(info.family, fmt, ARTIFACTS[fmt], data, names, own_classes, info.task,
                         reference, info, fast)

    est_features, est_classes, task = describe_estimator(model)
    family = boosters.family_of(model)
    names = _features(features, fitted_feature_names(model), len(est_features), "estimator")
    served = copy.deepcopy(model)  # as load_sync serves it
    drop_fitted_feature_names(served)
    if family == "sklearn":
        return _Prepared("sklearn", "joblib", ARTIFACT, None, names,
                         _classes(classes, est_classes, "estimator"), task, served)
    info = boosters.describe(boosters.wrapped_booster(served, family), family)
    if info.task != task or info.n_features != len(names) or (
            task == "classification" and info.n_classes != len(est_classes)):
        raise BoosterError(f"{type(model).__name__} disagrees with its booster "
                           f"({info.objective}, {info.n_features} features, "
                           f"{info.n_classes} classes)")
    boosters.set_threads(served, family, threads)
    fast = BoosterModel(boosters.wrapped_booster(served, family), info,
                        est_classes or None, threads=threads,
                        iteration_range=boosters.wrapper_iteration_range(served))
    return _Prepared(family, "joblib", ARTIFACT, None, names,
                     _classes(classes, est_classes, "estimator"), task, served, info, fast)


BackendChoice = Literal["auto", "sklearn", "library", "onnx", "treelite"]
"""What ``register`` tries: see there."""
COMPILE_TIMEOUT_S = 600.0
"""How long building one compiled candidate of a booster model may take (the C compiler on a
large model takes minutes)."""
PROBE_TIMEOUT_S = 300.0
"""How long a child process may take to load a booster file and predict with it."""
PROBE_TASK = "model_store.boosters:probe_native"
"""What the child process runs on a booster file before this process loads it."""


def _probe(data: bytes, fmt: Format) -> None:
    """``boosters.probe_native`` on ``data`` in a child process (``model_store.child``), after
    the checks that need no library: a file that crashes the library (9 of 1,200 fuzzed files
    got past the checks and did) crashes the child, and is refused. Raises BoosterError."""
    info = boosters.inspect_native(data, fmt)
    with tempfile.TemporaryDirectory(prefix="model-store-probe-") as tmp:
        path = Path(tmp) / ARTIFACTS[fmt]
        path.write_bytes(data)
        try:
            child.run(PROBE_TASK, {"path": str(path), "format": fmt}, timeout_s=PROBE_TIMEOUT_S)
        except child.ChildFailed as exc:
            if exc.crashed or exc.timed_out:
                raise BoosterError(f"{info.family} {exc} loading it or predicting with it"
                                   ) from exc
            raise BoosterError(str(exc)) from exc


def _verify_booster(manifest: Manifest, prepared: _Prepared, rows: np.ndarray | None,
                    proba_atol: float, value_rtol: float, *, fast: bool
                    ) -> tuple[Manifest, Expected]:
    """Check the model on the verification rows (its thresholds, ``rows``) and, with
    ``fast``, its booster path against the library's own predict; record both under
    ``backends[family]``. Returns the manifest and the library's own answers."""
    assert prepared.info is not None and prepared.fast is not None
    n_features = len(manifest.features)
    expected = Expected.of(prepared.served, verification_rows(
        prepared.served, n_features, rows, splits=prepared.info.splits))
    own = sklearn_checks(expected).get("label", {}).get("from_proba")
    record: dict[str, Any] = {"reference": _reference_name(prepared)}
    if fast:
        checks = verify_backend(expected, prepared.fast, proba_atol, value_rtol,
                                prepared.fast.via)
        label = checks["label"]
        if label.from_proba is not None:  # and the estimator's own labels are from_proba too
            checks["label"] = dataclasses.replace(label, from_proba=bool(
                label.from_proba and own))
        where = _where(manifest.name, manifest.version)
        for output, check in checks.items():
            if not check.verified:
                log.warning("%s: %s %s not verified (%s); %s serves it", where,
                            prepared.fast.via, output, check.reason, record["reference"])
        record["via"] = prepared.fast.via
        record["checks"] = {o: c.to_json() for o, c in checks.items()}
        one_row = prepared.fast.one_row
        if one_row is not None and _alone_as_in_a_block(prepared.fast, expected.rows):
            record["one_row"] = one_row
        elif one_row is not None:
            log.warning("%s: %s answers a row alone unlike %s in a block, which answers "
                        "lone rows too", where, one_row, prepared.fast.via)
    elif own is not None:
        record["checks"] = {"label": {"rows": len(expected.rows), "from_proba": own}}
    backends = {k: v for k, v in manifest.backends.items() if k != manifest.family}
    backends[manifest.family] = record
    return dataclasses.replace(manifest, backends=backends), expected


def _alone_as_in_a_block(model: BoosterModel, rows: np.ndarray, count: int = 256) -> bool:
    """Does ``model`` answer each of ``count`` of ``rows`` (spread over them) alone exactly
    as it answers them together, bit for bit?"""
    sample = rows[::max(1, len(rows) // count)][:count]
    labels, proba = model.run(sample)
    for i in range(len(sample)):
        one_labels, one_proba = model.run(sample[i:i + 1])
        if not np.array_equal(one_labels, labels[i:i + 1]) or (proba is not None and (
                one_proba is None or not np.array_equal(one_proba, proba[i:i + 1]))):
            return False
    return True


def _compile_booster(vdir: Path, manifest: Manifest, prepared: _Prepared, expected: Expected,
                     *, candidates: tuple[booster_compiled.Candidate, ...], required: bool,
                     proba_atol: float, value_rtol: float, timeout_s: float) -> Manifest:
    """Build, verify, measure and choose the compiled candidates of a booster model
    (``model_store.booster_compiled``); write the chosen ones' artifacts into ``vdir`` and
    return ``manifest`` with every candidate's record and the choice. Raises CompileError
    when ``required`` and the candidate cannot be built."""
    assert prepared.info is not None and prepared.fast is not None
    fast = prepared.fast
    if prepared.data is not None:
        native, fmt = prepared.data, prepared.format
    else:
        found = boosters.native_bytes(fast.booster)
        assert found is not None
        native, fmt = found
    library_call: Callable[[np.ndarray], Any] = fast.run
    if not _booster_verified(manifest):  # the library's own predict serves
        served = prepared.served
        library_call = (served.predict if prepared.task == "regression"
                        else lambda x: (served.predict(x), served.predict_proba(x)))
    try:
        outcome = booster_compiled.compile_booster(
            fast.booster, prepared.info, prepared.classes or None, native, fmt, expected,
            library=manifest.family, library_call=library_call, candidates=candidates,
            required=required, threads=fast.threads, iteration_range=fast.iteration_range,
            proba_atol=proba_atol, value_rtol=value_rtol, timeout_s=timeout_s)
    except booster_compiled.BuildError as exc:
        raise CompileError(f"{candidates[0]}: {exc}") from exc
    where = _where(manifest.name, manifest.version)
    for candidate, reason in outcome.choice["refused"].items():
        log.warning("%s: %s refused: %s", where, candidate, reason)
    for name, data in outcome.files.items():
        (vdir / name).write_bytes(data)
    backends = {k: v for k, v in manifest.backends.items()
                if k not in booster_compiled.CANDIDATES}
    backends.update(outcome.backends)
    return dataclasses.replace(manifest, backends=backends, choice=outcome.choice)


def _remove_unreferenced(vdir: Path, manifest: Manifest) -> None:
    """Compiled artifacts of earlier choices that the manifest no longer names (a gateway
    that loaded one keeps it: a library stays mapped, a session in memory)."""
    kept = {b.get("artifact") for b in manifest.backends.values() if isinstance(b, dict)}
    for path in vdir.glob("compiled-*"):
        if path.name not in kept:
            with contextlib.suppress(OSError):
                path.unlink()


def _reference_name(prepared: _Prepared) -> str:
    if prepared.format == "joblib":
        return f"{type(prepared.served).__name__}.predict"
    return ("xgboost Booster.predict(DMatrix)" if prepared.family == "xgboost"
            else "lightgbm Booster.predict")


def _write_manifest(vdir: Path, manifest: Manifest) -> None:
    """Replace ``vdir``'s manifest atomically (readers see the old or the new one)."""
    tmp = vdir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, vdir / MANIFEST)


class ModelStore:
    """Models on disk under ``root``; see the module docstring for the layout.

    ``loader`` unpickles a verified artifact (``joblib.load`` unless a test passes its own).
    ``load`` does not deduplicate concurrent calls: its caller decides (the gateway's registry
    loads under one lock, so each version once).
    """

    def __init__(self, root: Path | str, *, loader: Loader = joblib.load) -> None:
        self.root = Path(root)
        self._loader = loader

    # -- reading ---------------------------------------------------------------------------
    def models(self) -> dict[str, list[int]]:
        """Every model name with its versions, ascending. Empty when the root is missing."""
        return {name: sorted(versions) for name, versions in self._version_dirs().items()}

    def _version_dirs(self) -> dict[str, dict[int, Path]]:
        out: dict[str, dict[int, Path]] = {}
        if not self.root.is_dir():
            return out
        for model_dir in sorted(self.root.iterdir()):
            if not (_NAME.match(model_dir.name) and model_dir.is_dir()):
                continue
            versions = {
                int(v.name): v for v in model_dir.iterdir()
                if v.name.isdecimal() and v.name.isascii() and int(v.name) > 0 and v.is_dir()
            }
            if versions:
                out[model_dir.name] = versions
        return out

    def scan(self) -> dict[str, dict[int, str]]:
        """``{name: {version: stamp}}`` for every version on disk, without unpickling: the
        stamp is the sha256 of the manifest's bytes ("" when it is missing or unreadable), so
        a version that is added, removed, re-registered, recompiled or reconfigured shows as a
        difference between two scans (see ``changes``). Reads only the small manifests."""
        out: dict[str, dict[int, str]] = {}
        for name, versions in self._version_dirs().items():
            stamps: dict[int, str] = {}
            for version, vdir in sorted(versions.items()):
                try:
                    stamps[version] = hashlib.sha256((vdir / MANIFEST).read_bytes()).hexdigest()
                except OSError:
                    stamps[version] = ""
            out[name] = stamps
        return out

    @staticmethod
    def changes(before: Mapping[str, Mapping[int, str]],
                after: Mapping[str, Mapping[int, str]]) -> StoreChanges:
        """What was added, removed or changed between two ``scan`` results."""
        old = {(n, v): s for n, vs in before.items() for v, s in vs.items()}
        new = {(n, v): s for n, vs in after.items() for v, s in vs.items()}
        return StoreChanges(
            added=sorted(new.keys() - old.keys()),
            removed=sorted(old.keys() - new.keys()),
            changed=sorted(k for k in new.keys() & old.keys() if new[k] != old[k]),
        )

    def latest(self, name: str) -> int:
        """Highest version of ``name``. Raises ModelNotFound."""
        versions = self.models().get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found")
        return versions[-1]

    def resolve(self, name: str, version: int | str | None) -> int:
        """A concrete version for ``version`` (an int, its string, ``latest`` or None)."""
        if version is None or version == "latest":
            return self.latest(name)
        try:
            v = int(version)
        except (TypeError, ValueError):
            raise ModelNotFound(f"version {version!r} of model {name!r} is not a number") from None
        if v not in self.models().get(name, []):
            raise ModelNotFound(f"model {name!r} has no version {v}")
        return v

    def _vdir(self, name: str, version: int) -> Path:
        if not _NAME.match(name) or not (self.root / name / str(version)).is_dir():
            raise ModelNotFound(f"model {name!r} has no version {version}")
        return self.root / name / str(version)

    def manifest(self, name: str, version: int) -> Manifest:
        """The manifest of one version. Raises ModelNotFound or ArtifactRejected."""
        path = self._vdir(name, version) / MANIFEST
        where = _where(name, version)
        if not path.is_file():
            raise ArtifactRejected(f"{where}: {MANIFEST}: manifest missing")
        try:
            manifest = Manifest.from_json(json.loads(path.read_text()))
        except OSError as exc:
            raise ArtifactRejected(f"{where}: manifest unreadable: {exc.strerror}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactRejected(f"{where}: manifest unreadable: {exc}") from exc
        if manifest.name != name or manifest.version != version:
            raise ArtifactRejected(
                f"{where}: manifest names {manifest.name!r} v{manifest.version}"
            )
        return manifest

    def load_sync(self, name: str, version: int) -> LoadedModel:
        """Verify and load one version (blocking; prefer ``load`` from async code).

        A joblib artifact is unpickled (by the store's ``loader``); a native booster file is
        checked and loaded by its library (``model_store.boosters``), never unpickled. The
        estimator's remembered DataFrame column names are dropped (see
        ``model_store.feature_names``): the gateway passes plain rows in the same order. An
        XGBoost or LightGBM model is served through its booster where registration verified
        that path, with the version's ``threads`` setting (default 1).

        Raises:
            ModelNotFound: no such model or version.
            ArtifactRejected: missing manifest or artifact, sha256 mismatch (checked before
                unpickling or loading), an artifact that cannot be unpickled or loaded, is not
                an estimator (no ``predict``) or of another family, or whose feature count
                (classes, objective) disagrees with the manifest.
        """
        manifest = self.manifest(name, version)
        where = _where(name, version)
        artifact = self.root / name / str(version) / manifest.artifact
        if not artifact.is_file():
            raise ArtifactRejected(f"{where}: artifact {manifest.artifact} missing")
        if manifest.format != "joblib":
            return self._load_native(manifest, artifact)
        try:
            actual = sha256_file(artifact)
        except OSError as exc:
            raise ArtifactRejected(f"{where}: {manifest.artifact} unreadable: {exc.strerror}"
                                   ) from exc
        if actual != manifest.sha256:
            raise ArtifactRejected(
                f"{where}: {manifest.artifact}: sha256 mismatch (manifest "
                f"{manifest.sha256[:12]}…, file {actual[:12]}…); refusing to unpickle"
            )
        try:
            estimator = self._loader(artifact)
        except _UNPICKLE_ERRORS as exc:
            reason = (exc.strerror if isinstance(exc, OSError)
                      else (str(exc).splitlines() or [""])[0][:200])
            raise ArtifactRejected(f"{where}: {manifest.artifact} cannot be unpickled: "
                                   f"{type(exc).__name__}: {reason}") from exc
        _check_estimator(manifest, estimator)
        drop_fitted_feature_names(estimator)
        if manifest.family != "sklearn":
            fast = _wrapper_booster(manifest, estimator)
            chosen = self._load_chosen(manifest, estimator, lambda: boosters.describe(
                boosters.wrapped_booster(estimator, manifest.family), manifest.family))
            return LoadedModel(manifest, estimator, booster=fast, chosen=chosen)
        return LoadedModel(manifest, estimator, self._load_compiled(manifest, estimator),
                           _fast_forest(estimator, len(manifest.features)))

    def _load_native(self, manifest: Manifest, artifact: Path) -> LoadedModel:
        """A native booster file: its bytes read once, their sha256 checked, then checked and
        loaded by the library from those same bytes."""
        where = _where(manifest.name, manifest.version)
        try:
            data = artifact.read_bytes()
        except OSError as exc:
            raise ArtifactRejected(f"{where}: {manifest.artifact} unreadable: {exc.strerror}"
                                   ) from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != manifest.sha256:
            raise ArtifactRejected(
                f"{where}: {manifest.artifact}: sha256 mismatch (manifest "
                f"{manifest.sha256[:12]}…, file {actual[:12]}…); refusing to load"
            )
        try:
            booster, info = boosters.read_native(data, manifest.format)
        except BoosterError as exc:
            raise ArtifactRejected(f"{where}: {manifest.artifact}: {exc}") from exc
        if (info.family, info.objective, info.task, info.n_features, info.n_classes) != (
                manifest.family, manifest.objective, manifest.task, len(manifest.features),
                len(manifest.classes)):
            raise ArtifactRejected(
                f"{where}: {manifest.artifact} holds a {info.family} {info.objective} model of "
                f"{info.n_features} features and {info.n_classes} classes, the manifest says "
                f"{manifest.family} {manifest.objective}, {len(manifest.features)} and "
                f"{len(manifest.classes)}")
        threads = manifest.settings.threads or boosters.DEFAULT_THREADS
        classes = manifest.classes or None
        estimator = NativeEstimator(booster, info, classes, threads=threads)
        fast = (BoosterModel(booster, info, classes, threads=threads,
                             via=manifest.via(), one_row=manifest.one_row() is not None)
                if _booster_verified(manifest) else None)
        return LoadedModel(manifest, estimator, booster=fast,
                           chosen=self._load_chosen(manifest, estimator, lambda: info))

    def _load_chosen(self, manifest: Manifest, estimator: Any,
                     info_of: Callable[[], BoosterInfo]) -> dict[str, Runs]:
        """The compiled candidates the manifest chose for some output of a booster model:
        each artifact's sha256 checked before it is loaded (ArtifactRejected otherwise), then
        verified again against ``estimator`` (the library's own predict) on 2,000 rows over
        the model's thresholds, with the tolerances recorded at registration. One that does
        not load or verify here (another machine, another library build) is left out with a
        warning: the library serves its outputs."""
        names = sorted({c for o in ("label", "probabilities")
                        if (c := manifest.chosen(o)) is not None})
        if not names:
            return {}
        where = _where(manifest.name, manifest.version)
        vdir = self.root / manifest.name / str(manifest.version)
        info = info_of()
        classes = manifest.classes or None
        rows = verification_rows(None, info.n_features, generated=2_000, splits=info.splits)
        expected = Expected.of(estimator, rows)
        out: dict[str, Runs] = {}
        for name in names:
            record = manifest.backends.get(name, {})
            artifact, digest = record.get("artifact"), record.get("sha256")
            if not artifact or not digest:
                raise ArtifactRejected(f"{where}: {name} is chosen but has no recorded artifact")
            try:
                data = (vdir / str(artifact)).read_bytes()
            except OSError as exc:
                raise ArtifactRejected(f"{where}: compiled artifact {artifact} unreadable: "
                                       f"{exc.strerror}") from exc
            if hashlib.sha256(data).hexdigest() != digest:
                raise ArtifactRejected(f"{where}: {artifact}: sha256 mismatch with the "
                                       "manifest; refusing to load")
            try:
                model = booster_compiled.load_candidate(
                    name, data, info, classes,
                    threads=manifest.settings.threads or boosters.DEFAULT_THREADS)
            except booster_compiled.BuildError as exc:
                log.warning("%s: %s not loaded, %s serves: %s", where, name, manifest.family,
                            exc)
                continue
            checks = record.get("checks", {})
            found = booster_compiled.verify(
                expected, model, name,
                float(checks.get("probabilities", {}).get("atol", 1e-6)),
                float(checks.get("label", {}).get("rtol", 1e-5)))
            failed = [c.reason for o, c in found.items()
                      if manifest.chosen(o) == name and not c.verified]
            if failed:
                log.warning("%s: %s not verified again, %s serves: %s", where, name,
                            manifest.family, "; ".join(failed))
                continue
            out[name] = model
        return out

    def _load_compiled(self, manifest: Manifest, estimator: Any) -> OnnxModel | None:
        """The verified compiled model, if the manifest has one; its sha256 is checked before
        it is loaded, like the joblib artifact's."""
        onnx = manifest.backends.get("onnx", {})
        if "sha256" not in onnx:
            return None
        where = _where(manifest.name, manifest.version)
        path = self.root / manifest.name / str(manifest.version) / onnx["artifact"]
        if not path.is_file():
            raise ArtifactRejected(f"{where}: compiled artifact {onnx['artifact']} missing")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactRejected(f"{where}: {onnx['artifact']} unreadable: {exc.strerror}"
                                   ) from exc
        if hashlib.sha256(data).hexdigest() != onnx["sha256"]:
            raise ArtifactRejected(f"{where}: {onnx['artifact']}: sha256 mismatch with the "
                                   "manifest; refusing to load")
        # Manifests written before "input" was recorded fed float64 rows rounded through float32.
        round_input = bool(onnx.get("round_input", "input" not in onnx))
        try:
            return OnnxModel(data, getattr(estimator, "classes_", None), round_input=round_input)
        except CompileError as exc:
            log.warning("%s: compiled backend not loaded, serving sklearn: %s", where, exc)
            return None

    async def load(self, name: str, version: int) -> LoadedModel:
        """``load_sync`` in a worker thread. Raises as ``load_sync`` does."""
        return await anyio.to_thread.run_sync(self.load_sync, name, version)

    # -- writing ---------------------------------------------------------------------------
    def register(
        self,
        model: Any,
        name: str,
        *,
        version: int | None = None,
        features: Sequence[str] | None = None,
        classes: Sequence[Any] | None = None,
        format: Format | None = None,
        backend: BackendChoice = "auto",
        train_rows: np.ndarray | None = None,
        proba_atol: float = 1e-6,
        value_rtol: float = 1e-5,
        settings: ModelSettings | Mapping[str, Any] | None = None,
        compile_timeout_s: float = COMPILE_TIMEOUT_S,
    ) -> Manifest:
        """Store a model as a new version and return its manifest.

        ``model`` is a fitted estimator (pickled with joblib: scikit-learn, or an XGBoost or
        LightGBM wrapper), the path of a native booster file (XGBoost ``.json``/``.ubj``,
        LightGBM ``.txt``; ``format`` names it when the suffix does not), or an XGBoost or
        LightGBM ``Booster`` (stored natively: UBJSON, text). A native file is stored as it
        is and loaded without unpickling.

        ``version`` defaults to the next one. ``features`` default to the names the model
        was fitted with (a DataFrame's columns, a booster's feature names), else ``f0..fN``;
        given together, they must be equal. ``classes`` name a native booster's classes
        (default 0..k-1); for an estimator they must equal its ``classes_``. The version
        directory is written under a temporary name and renamed into place, so readers never
        see half a version. The model is checked on the verification rows (``train_rows``
        plus generated ones): for a classifier, whether its labels are
        ``classes[argmax(predict_proba)]`` (recorded for one-call answers). ``backend``
        ``auto`` also compiles a scikit-learn estimator (see ``compile``), falling back to
        sklearn with a logged reason when it cannot be converted; for an XGBoost or LightGBM
        model it verifies the booster path against the library's own predict, then builds,
        verifies and measures the compiled candidates (ONNX, Treelite; each build within
        ``compile_timeout_s``) and serves each output by the fastest that verifies it
        (``model_store.booster_compiled``); a candidate that fails is recorded as refused,
        with its reason. ``onnx`` (``treelite``: boosters only) requires that conversion and
        serves it for each output it verifies; ``library`` stops at the booster path (no
        compiled candidate; for scikit-learn, the same as ``sklearn``); ``sklearn`` keeps the
        estimator's (the library's) own methods only. A booster file is loaded and predicted
        with in a child process before this one loads it, so a file that crashes the library
        is refused.

        Raises:
            ValueError: bad name, version taken or not positive, not a fitted estimator or
                not a usable booster file (``BoosterError``; a crash of the library on it
                too), feature names or classes that disagree with the model, training rows of
                the wrong shape, bad settings, ``treelite`` for a scikit-learn model.
            CompileError: ``backend`` ``onnx`` or ``treelite`` and the model cannot be
                converted.
            OSError: the booster file cannot be read.
        """
        if not _NAME.match(name):
            raise ValueError(f"invalid model name {name!r}")
        existing = self.models().get(name, [])
        if version is None:
            version = (existing[-1] + 1) if existing else 1
        if version < 1:
            raise ValueError(f"version must be a positive integer, got {version}")
        if version in existing:
            raise ValueError(f"model {name!r} already has version {version}")
        model_settings = (settings if isinstance(settings, ModelSettings)
                          else ModelSettings.from_json(settings))
        prepared = _prepare(model, format, features, classes,
                            model_settings.threads or boosters.DEFAULT_THREADS)
        if prepared.family == "sklearn" and model_settings.threads is not None:
            raise ValueError("threads: a setting of XGBoost and LightGBM models only")
        if prepared.family == "sklearn" and backend == "treelite":
            raise ValueError("treelite: a backend of XGBoost and LightGBM models only")
        rows = _check_rows(train_rows, len(prepared.features))

        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / f".{version}-{secrets.token_hex(8)}"
        tmp.mkdir()  # permissions from the umask, like the files (mkdtemp's would be 0700)
        try:
            if prepared.data is None:
                joblib.dump(model, tmp / prepared.artifact)
            else:
                (tmp / prepared.artifact).write_bytes(prepared.data)
            manifest = Manifest(
                name=name,
                version=version,
                sha256=sha256_file(tmp / prepared.artifact),
                features=prepared.features,
                classes=prepared.classes,
                task=prepared.task,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                library_versions=library_versions(prepared.family),
                artifact=prepared.artifact,
                settings=model_settings,
                family=prepared.family,
                format=prepared.format,
                objective="" if prepared.info is None else prepared.info.objective,
            )
            if prepared.family == "sklearn":
                manifest = _verify_into(tmp, manifest, prepared.served, rows, proba_atol,
                                        value_rtol,
                                        compile_to=None if backend in ("sklearn", "library")
                                        else "onnx",
                                        required=backend == "onnx")
            else:
                manifest, expected = _verify_booster(manifest, prepared, rows, proba_atol,
                                                     value_rtol, fast=backend != "sklearn")
                candidates = {"auto": booster_compiled.CANDIDATES, "onnx": ("onnx",),
                              "treelite": ("treelite",)}.get(backend, ())
                if candidates:
                    manifest = _compile_booster(
                        tmp, manifest, prepared, expected, candidates=candidates,
                        required=backend != "auto", proba_atol=proba_atol,
                        value_rtol=value_rtol, timeout_s=compile_timeout_s)
            _write_manifest(tmp, manifest)
            os.rename(tmp, model_dir / str(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):  # only while empty: no version of it
                model_dir.rmdir()
            raise
        return manifest

    def compile(
        self,
        name: str,
        version: int,
        *,
        train_rows: np.ndarray | None = None,
        proba_atol: float = 1e-6,
        value_rtol: float = 1e-5,
        compile_timeout_s: float = COMPILE_TIMEOUT_S,
    ) -> Manifest:
        """Compile an existing version, verify it per output, record the result in its
        manifest (replaced atomically) and return the new manifest: a scikit-learn estimator
        to ONNX; an XGBoost or LightGBM model's candidates built, verified, measured and chosen
        again as ``register`` does with ``backend="auto"`` (new artifacts get new names; those
        the new manifest no longer names are removed once it is in place).

        Raises:
            ModelNotFound, ArtifactRejected: as ``load_sync``.
            ValueError: training rows of the wrong shape.
            CompileError: the estimator cannot be converted (the manifest records why).
        """
        loaded = self.load_sync(name, version)
        vdir = self.root / name / str(version)
        rows = _check_rows(train_rows, len(loaded.manifest.features))
        if loaded.manifest.family != "sklearn":
            return self._compile_booster(loaded, vdir, rows, proba_atol, value_rtol,
                                         compile_timeout_s)
        manifest = _verify_into(vdir, loaded.manifest, loaded.estimator, rows, proba_atol,
                                value_rtol, compile_to="onnx", required=False)
        _write_manifest(vdir, manifest)
        if "error" in manifest.backends.get("onnx", {}):
            raise CompileError(manifest.backends["onnx"]["error"])
        return manifest

    def _compile_booster(self, loaded: LoadedModel, vdir: Path, rows: np.ndarray | None,
                         proba_atol: float, value_rtol: float, timeout_s: float) -> Manifest:
        m = loaded.manifest
        threads = loaded.threads or boosters.DEFAULT_THREADS
        source: Any = loaded.estimator
        if m.format != "joblib":  # the registered file, checked (sha256) as load_sync did
            source = vdir / m.artifact
            if sha256_file(source) != m.sha256:
                raise ArtifactRejected(f"{_where(m.name, m.version)}: {m.artifact}: sha256 "
                                       "mismatch with the manifest; refusing to load")
        prepared = _prepare(source, m.format if m.format != "joblib" else None, m.features,
                            m.classes or None, threads, probe=False)
        manifest, expected = _verify_booster(m, prepared, rows, proba_atol, value_rtol,
                                             fast=True)
        manifest = _compile_booster(vdir, manifest, prepared, expected,
                                    candidates=booster_compiled.CANDIDATES, required=False,
                                    proba_atol=proba_atol, value_rtol=value_rtol,
                                    timeout_s=timeout_s)
        _write_manifest(vdir, manifest)
        _remove_unreferenced(vdir, manifest)
        return manifest

    def configure(
        self,
        name: str,
        version: int,
        values: Mapping[str, Any] | None = None,
        *,
        unset: Iterable[str] = (),
    ) -> Manifest:
        """Set (``values``) or clear (``unset``) serving settings of one version, rewrite its
        manifest atomically and return it. The artifact and its digest are unchanged, so
        cached answers stay valid.

        Raises:
            ModelNotFound, ArtifactRejected: as ``manifest``.
            ValueError: an unknown setting or a value out of range; ``threads`` for a
                scikit-learn model.
        """
        manifest = self.manifest(name, version)
        updated = dataclasses.replace(
            manifest, settings=manifest.settings.updated(dict(values or {}), tuple(unset)))
        if manifest.family == "sklearn" and updated.settings.threads is not None:
            raise ValueError("threads: a setting of XGBoost and LightGBM models only")
        _write_manifest(self._vdir(name, version), updated)
        return updated


def _verify_into(
    vdir: Path,
    manifest: Manifest,
    estimator: Any,
    train_rows: np.ndarray | None,
    proba_atol: float,
    value_rtol: float,
    *,
    compile_to: Literal["onnx"] | None,
    required: bool,
) -> Manifest:
    """Check ``estimator`` on the verification rows and, with ``compile_to``, write
    ``model.onnx`` into ``vdir``; return ``manifest`` with what was found.

    A conversion failure is recorded (and logged); it raises only when ``required``.
    """
    n_features = len(manifest.features)
    expected = Expected.of(estimator, verification_rows(estimator, n_features, train_rows))
    backends = {k: v for k, v in manifest.backends.items() if k not in ("sklearn", "onnx")}
    own = sklearn_checks(expected)
    if own:
        backends["sklearn"] = {"checks": own}
    if compile_to is None:
        return dataclasses.replace(manifest, backends=backends)
    where = _where(manifest.name, manifest.version)
    try:
        compiled = compile_estimator(estimator, n_features, expected, proba_atol=proba_atol,
                                     value_rtol=value_rtol)
    except CompileError as exc:
        if required:
            raise
        log.warning("%s: not compiled, serving sklearn: %s", where, exc)
        backends["onnx"] = {"error": str(exc)}
        return dataclasses.replace(manifest, backends=backends)
    for output, check in compiled.checks.items():
        if not check.verified:
            log.warning("%s: onnx %s not verified (%s); sklearn serves it", where, output,
                        check.reason)
    (vdir / ONNX_ARTIFACT).write_bytes(compiled.data)
    backends["onnx"] = {
        "artifact": ONNX_ARTIFACT,
        "sha256": hashlib.sha256(compiled.data).hexdigest(),
        "input": compiled.input_type,
        "round_input": compiled.round_input,
        "checks": {o: c.to_json() for o, c in compiled.checks.items()},
        "tried": compiled.tried,
        "library_versions": compiled_library_versions(),
    }
    return dataclasses.replace(manifest, backends=backends)
