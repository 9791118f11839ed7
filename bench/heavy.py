"""The heavy workload: gradient-boosted binary classifiers of the size tabular teams deploy.

``lgbm-heavy`` (LightGBM, a native text file) and ``xgb-heavy`` (XGBoost, a native UBJSON file):
500 trees of depth 8 (LightGBM: up to 255 leaves) on 100 features, trained at bench time on
synthetic rows drawn from a fixed seed; nothing is downloaded. Training is reproducible: the
same ``Spec`` gives the same file, byte for byte (both libraries run with a fixed thread count
and, for LightGBM, ``deterministic``), so its sha256 names the model.

``ensure_heavy`` trains a missing model into a temporary directory and registers the native file
through the store's own API (``ModelStore.register``, as ``python -m model_store register``
does: the store checks the file in a child process, verifies it and chooses its backend), with
training rows for its verification; a model already in the store is left as it is.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_store import ModelStore
from model_store.boosters import Family
from model_store.store import BackendChoice

__all__ = ["HEAVY", "Spec", "ensure_heavy", "train", "training_rows"]

_TRAIN_THREADS = 1  # fixed (and one: OpenMP threads on a shared machine crawl), so the file
# does not depend on the machine


@dataclass(frozen=True, slots=True)
class Spec:
    """One heavy model: its library and size, and the seed of its training rows."""

    family: Family
    trees: int = 500
    depth: int = 8
    leaves: int = 255  # LightGBM's num_leaves (XGBoost grows depth-wise to ``depth``)
    features: int = 100
    rows: int = 10_000
    seed: int = 22

    def __post_init__(self) -> None:
        if self.family not in ("lightgbm", "xgboost"):
            raise ValueError(f"no heavy model of family {self.family!r}")
        if min(self.trees, self.depth, self.leaves, self.rows) < 1 or self.features < 2:
            raise ValueError(f"a heavy model needs trees, depth, leaves, rows >= 1 and "
                             f"features >= 2: {self}")

    @property
    def suffix(self) -> str:
        return ".txt" if self.family == "lightgbm" else ".ubj"


HEAVY: dict[str, Spec] = {
    "lgbm-heavy": Spec("lightgbm"),
    "xgb-heavy": Spec("xgboost"),
}
"""The heavy models by name (``--model`` of the bench)."""


def training_rows(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """``spec.rows`` rows of ``spec.features`` standard-normal features and their 0/1 labels:
    a noisy function of a linear part, pairwise products and thresholds of the first 20
    features (at least 2), so that deep trees keep finding splits."""
    rng = np.random.default_rng(spec.seed)
    x = rng.normal(size=(spec.rows, spec.features))
    k = min(20, spec.features)
    signal = x[:, :k] @ rng.normal(size=k)
    signal += (x[:, 0:k - 1:2] * x[:, 1:k:2]).sum(axis=1)  # pairwise interactions
    signal += 1.5 * (x[:, 0] > 0.5) - 1.5 * (x[:, k - 1] < -0.5)  # thresholds
    y = (signal + rng.normal(size=spec.rows) > 0).astype(np.int64)
    return x, y


def train(spec: Spec, directory: Path) -> Path:
    """Train ``spec`` and save it natively under ``directory``; the file's path."""
    x, y = training_rows(spec)
    path = directory / f"{spec.family}-{spec.trees}x{spec.depth}-{spec.features}f{spec.suffix}"
    if spec.family == "lightgbm":
        import lightgbm

        params = {"objective": "binary", "num_leaves": spec.leaves, "max_depth": spec.depth,
                  "learning_rate": 0.05, "min_child_samples": 10, "num_threads": _TRAIN_THREADS,
                  "deterministic": True, "force_row_wise": True, "seed": spec.seed,
                  "verbose": -1}
        booster = lightgbm.train(params, lightgbm.Dataset(x, y), num_boost_round=spec.trees)
        booster.save_model(path)
    else:
        import xgboost

        params = {"objective": "binary:logistic", "max_depth": spec.depth, "eta": 0.05,
                  "tree_method": "hist", "nthread": _TRAIN_THREADS, "seed": spec.seed}
        xgb = xgboost.train(params, xgboost.DMatrix(x, label=y), num_boost_round=spec.trees)
        xgb.save_model(path)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_heavy(root: Path, name: str, spec: Spec | None = None, *,
                 backend: BackendChoice = "auto") -> tuple[str, ...]:
    """The features of heavy model ``name`` in the store at ``root``, trained and registered
    (with 2,000 of its training rows for verification, ``backend`` as ``register`` takes it:
    by default every candidate is built and measured, the fastest verified one serves) when
    the store has no version of it."""
    spec = spec or HEAVY[name]
    store = ModelStore(root)
    if not store.models().get(name):
        with tempfile.TemporaryDirectory(prefix="heavy-") as tmp:
            path = train(spec, Path(tmp))
            store.register(path, name, backend=backend,
                           train_rows=training_rows(spec)[0][:2_000])
    return store.manifest(name, store.latest(name)).features
