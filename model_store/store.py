"""Versioned model store on disk.

Layout: ``<root>/<name>/<version>/`` holds the artifact ``model.joblib`` and the manifest
``model.json``. Versions are positive integers; ``latest`` is the highest. Loading checks the
artifact's sha256 against the manifest *before* unpickling it, then checks the estimator
against the manifest, so a tampered or mismatched artifact is never served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import joblib
import numpy as np
import sklearn

from model_store.compiled import (
    ONNX_ARTIFACT,
    CompileError,
    OnnxModel,
    compiled_library_versions,
    convert_onnx,
    verification_rows,
    verify,
)

if TYPE_CHECKING:
    from gateway.core.singleflight import SingleFlight

ARTIFACT = "model.joblib"
MANIFEST = "model.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

log = logging.getLogger("model_store")

Task = Literal["classification", "regression"]
Loader = Callable[[Path], Any]


class ModelStoreError(Exception):
    """A model, version or artifact is missing or cannot be trusted."""


class ModelNotFound(ModelStoreError):
    """No such model name, or no such version of it."""


class ArtifactRejected(ModelStoreError):
    """The files exist but were refused: missing manifest, digest mismatch, shape mismatch."""


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
    """Compiled backends: ``{"onnx": {"artifact", "sha256", "checks": {output: {...}}, ...}}``
    or ``{"onnx": {"error": "<why it could not be compiled>"}}``."""

    @property
    def digest(self) -> str:
        """Short version digest used in cache keys: a new artifact gets a new digest."""
        return self.sha256[:16]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["features"] = list(self.features)
        data["classes"] = list(self.classes)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
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
        )

    def verified(self, backend: str, output: str) -> bool:
        """Was ``backend`` verified against the estimator for ``output``?"""
        checks = self.backends.get(backend, {}).get("checks", {})
        return bool(checks.get(output, {}).get("verified", False))


Backend = Literal["sklearn", "onnx"]


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified manifest with its estimator (and compiled model, if any), ready to predict.

    Each output is served by the compiled model only where the manifest records that it was
    verified for that output; ``prefer_compiled=False`` forces the estimator.
    """

    manifest: Manifest
    estimator: Any
    compiled: OnnxModel | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def has_proba(self) -> bool:
        return self.manifest.task == "classification" and hasattr(self.estimator, "predict_proba")

    def backend(self, output: str, *, prefer_compiled: bool = True) -> Backend:
        """Which backend answers ``output`` (``label`` or ``probabilities``)."""
        if prefer_compiled and self.compiled is not None and self.manifest.verified("onnx", output):
            return "onnx"
        return "sklearn"

    def backends(self, *, prefer_compiled: bool = True) -> dict[str, Backend]:
        outputs = ["label", "probabilities"] if self.has_proba else ["label"]
        return {o: self.backend(o, prefer_compiled=prefer_compiled) for o in outputs}

    def predict(self, rows: np.ndarray, *, prefer_compiled: bool = True) -> list[Any]:
        """Labels (or values) for ``rows`` as plain Python objects, in row order."""
        if self.compiled is not None and self.backend("label", prefer_compiled=prefer_compiled) \
                == "onnx":
            values = self.compiled.predict(rows)
        else:
            values = self.estimator.predict(rows)
        out: list[Any] = values.tolist()
        return out

    def predict_proba(self, rows: np.ndarray, *, prefer_compiled: bool = True
                      ) -> list[list[float]]:
        """Class probabilities for ``rows``, columns in ``manifest.classes`` order."""
        if self.compiled is not None and self.backend(
                "probabilities", prefer_compiled=prefer_compiled) == "onnx":
            values = self.compiled.predict_proba(rows)
        else:
            values = self.estimator.predict_proba(rows)
        out: list[list[float]] = np.asarray(values, dtype=np.float64).tolist()
        return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "sklearn": sklearn.__version__,
        "joblib": joblib.__version__,
        "numpy": np.__version__,
    }


def describe_estimator(estimator: Any) -> tuple[tuple[str, ...], tuple[Any, ...], Task]:
    """Feature names, classes and task type read from a fitted estimator.

    Raises:
        ValueError: the estimator is not fitted or exposes no feature count.
    """
    n = getattr(estimator, "n_features_in_", None)
    if n is None:
        raise ValueError("estimator is not fitted (no n_features_in_)")
    names = getattr(estimator, "feature_names_in_", None)
    features = tuple(str(x) for x in names) if names is not None else tuple(
        f"f{i}" for i in range(int(n))
    )
    classes_ = getattr(estimator, "classes_", None)
    if classes_ is None:
        return features, (), "regression"
    return features, tuple(np.asarray(classes_).tolist()), "classification"


class ModelStore:
    """Models on disk under ``root``; see the module docstring for the layout.

    ``loader`` unpickles a verified artifact (``joblib.load`` unless a test passes its own).
    """

    def __init__(self, root: Path | str, *, loader: Loader = joblib.load) -> None:
        self.root = Path(root)
        self._loader = loader
        # Imported here: the gateway package imports this module, and either may load first.
        from gateway.core.singleflight import SingleFlight

        self._loads: SingleFlight[tuple[str, int], LoadedModel] = SingleFlight()

    # -- reading ---------------------------------------------------------------------------
    def models(self) -> dict[str, list[int]]:
        """Every model name with its versions, ascending. Empty when the root is missing."""
        out: dict[str, list[int]] = {}
        if not self.root.is_dir():
            return out
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            versions = sorted(
                int(v.name) for v in model_dir.iterdir()
                if v.is_dir() and v.name.isdigit() and int(v.name) > 0
            )
            if versions:
                out[model_dir.name] = versions
        return out

    def latest(self, name: str) -> int:
        """Highest version of ``name``. Raises ModelNotFound."""
        versions = self.models().get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found under {self.root}")
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

    def manifest(self, name: str, version: int) -> Manifest:
        """The manifest of one version. Raises ModelNotFound or ArtifactRejected."""
        vdir = self.root / name / str(version)
        if not vdir.is_dir():
            raise ModelNotFound(f"model {name!r} has no version {version} ({vdir})")
        path = vdir / MANIFEST
        if not path.is_file():
            raise ArtifactRejected(f"{path}: manifest missing")
        try:
            manifest = Manifest.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactRejected(f"{path}: manifest unreadable: {exc}") from exc
        if manifest.name != name or manifest.version != version:
            raise ArtifactRejected(
                f"{path}: manifest names {manifest.name!r} v{manifest.version}, "
                f"expected {name!r} v{version}"
            )
        return manifest

    def load_sync(self, name: str, version: int) -> LoadedModel:
        """Verify and unpickle one version (blocking; prefer ``load`` from async code).

        Raises:
            ModelNotFound: no such model or version.
            ArtifactRejected: missing manifest or artifact, sha256 mismatch (checked before
                unpickling), or an estimator whose feature count disagrees with the manifest.
        """
        manifest = self.manifest(name, version)
        artifact = self.root / name / str(version) / manifest.artifact
        if not artifact.is_file():
            raise ArtifactRejected(f"{artifact}: artifact missing")
        actual = sha256_file(artifact)
        if actual != manifest.sha256:
            raise ArtifactRejected(
                f"{artifact}: sha256 mismatch (manifest {manifest.sha256[:12]}…, "
                f"file {actual[:12]}…); refusing to unpickle"
            )
        estimator = self._loader(artifact)
        n = getattr(estimator, "n_features_in_", None)
        if n is not None and int(n) != len(manifest.features):
            raise ArtifactRejected(
                f"{artifact}: estimator expects {n} features, manifest lists "
                f"{len(manifest.features)}"
            )
        return LoadedModel(manifest, estimator, self._load_compiled(manifest, estimator))

    def _load_compiled(self, manifest: Manifest, estimator: Any) -> OnnxModel | None:
        """The verified compiled model, if the manifest has one; its sha256 is checked before
        it is loaded, like the joblib artifact's."""
        onnx = manifest.backends.get("onnx", {})
        if "sha256" not in onnx:
            return None
        path = self.root / manifest.name / str(manifest.version) / onnx["artifact"]
        if not path.is_file():
            raise ArtifactRejected(f"{path}: compiled artifact missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != onnx["sha256"]:
            raise ArtifactRejected(f"{path}: sha256 mismatch with the manifest; refusing to load")
        try:
            return OnnxModel(data, getattr(estimator, "classes_", None))
        except CompileError as exc:
            log.warning("%s: compiled backend not loaded, serving sklearn: %s", path, exc)
            return None

    async def load(self, name: str, version: int) -> LoadedModel:
        """``load_sync`` in a worker thread; concurrent loads of one version load it once."""

        async def _load(_positions: list[int]) -> list[LoadedModel]:
            return [await anyio.to_thread.run_sync(self.load_sync, name, version)]

        (model,), _shared = await self._loads.do([(name, version)], _load)
        return model

    # -- writing ---------------------------------------------------------------------------
    def register(
        self,
        estimator: Any,
        name: str,
        *,
        version: int | None = None,
        features: Sequence[str] | None = None,
        backend: Literal["auto", "sklearn", "onnx"] = "auto",
        train_rows: np.ndarray | None = None,
        proba_atol: float = 1e-6,
    ) -> Manifest:
        """Store a fitted estimator as a new version and return its manifest.

        ``version`` defaults to the next one. The version directory is written under a
        temporary name and renamed into place, so readers never see half a version.
        ``backend`` ``auto`` also compiles it (see ``compile``), falling back to sklearn with
        a logged reason when it cannot be converted; ``onnx`` requires the conversion.

        Raises:
            ValueError: bad name, version taken or not positive, feature list that disagrees
                with the estimator.
            CompileError: ``backend="onnx"`` and the estimator cannot be converted.
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
        est_features, classes, task = describe_estimator(estimator)
        if features is not None:
            if len(features) != len(est_features):
                raise ValueError(
                    f"{len(features)} feature names given, estimator expects {len(est_features)}"
                )
            est_features = tuple(features)

        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
        try:
            joblib.dump(estimator, tmp / ARTIFACT)
            manifest = Manifest(
                name=name,
                version=version,
                sha256=sha256_file(tmp / ARTIFACT),
                features=est_features,
                classes=classes,
                task=task,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                library_versions=library_versions(),
            )
            if backend != "sklearn":
                manifest = _compile_into(tmp, manifest, estimator, train_rows, proba_atol,
                                         required=backend == "onnx")
            (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
            os.rename(tmp, model_dir / str(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def compile(
        self,
        name: str,
        version: int,
        *,
        train_rows: np.ndarray | None = None,
        proba_atol: float = 1e-6,
    ) -> Manifest:
        """Compile an existing version to ONNX, verify it per output, record the result in
        its manifest (replaced atomically) and return the new manifest.

        Raises:
            ModelNotFound, ArtifactRejected: as ``load_sync``.
            CompileError: the estimator cannot be converted (the manifest records why).
        """
        loaded = self.load_sync(name, version)
        vdir = self.root / name / str(version)
        manifest = _compile_into(vdir, loaded.manifest, loaded.estimator, train_rows,
                                 proba_atol, required=False)
        tmp = vdir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        os.replace(tmp, vdir / MANIFEST)
        if "error" in manifest.backends.get("onnx", {}):
            raise CompileError(manifest.backends["onnx"]["error"])
        return manifest


def _compile_into(
    vdir: Path,
    manifest: Manifest,
    estimator: Any,
    train_rows: np.ndarray | None,
    proba_atol: float,
    *,
    required: bool,
) -> Manifest:
    """Write ``model.onnx`` into ``vdir`` and return ``manifest`` with what verification found.

    A conversion failure is recorded (and logged); it raises only when ``required``.
    """
    n_features = len(manifest.features)
    try:
        data = convert_onnx(estimator, n_features)
    except CompileError as exc:
        if required:
            raise
        log.warning("%s v%d: not compiled, serving sklearn: %s", manifest.name,
                    manifest.version, exc)
        return dataclasses.replace(manifest, backends={"onnx": {"error": str(exc)}})
    rows = verification_rows(estimator, n_features, train_rows)
    checks = verify(estimator, OnnxModel(data, getattr(estimator, "classes_", None)), rows,
                    proba_atol)
    for output, check in checks.items():
        if not check.verified:
            log.warning("%s v%d: onnx %s not verified (mismatches %d, max diff %.3g); "
                        "sklearn serves it", manifest.name, manifest.version, output,
                        check.mismatches, check.max_abs_diff)
    (vdir / ONNX_ARTIFACT).write_bytes(data)
    return dataclasses.replace(manifest, backends={"onnx": {
        "artifact": ONNX_ARTIFACT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "checks": {o: c.to_json() for o, c in checks.items()},
        "library_versions": compiled_library_versions(),
    }})
