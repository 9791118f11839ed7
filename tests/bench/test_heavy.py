"""The heavy workload's models: reproducible files, registered through the store."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from bench.heavy import HEAVY, Spec, ensure_heavy, train
from model_store import ModelStore

# The heavy models' shape, at a size where the point is reproducibility, not the size.
TINY = {family: Spec(family, trees=4, depth=3, leaves=8, features=6, rows=400)
        for family in ("lightgbm", "xgboost")}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", sorted(TINY))
def test_the_same_seed_gives_the_same_file(tmp_path: Path, family: str) -> None:
    spec = TINY[family]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    first, again = train(spec, tmp_path / "a"), train(spec, tmp_path / "b")
    other = train(replace(spec, seed=spec.seed + 1), tmp_path / "c")
    assert _sha256(first) == _sha256(again)
    assert _sha256(first) != _sha256(other)
    assert first.suffix == (".txt" if family == "lightgbm" else ".ubj")


def test_the_heavy_models_are_the_size_the_issue_names() -> None:
    assert {s.family for s in HEAVY.values()} == {"lightgbm", "xgboost"}
    for spec in HEAVY.values():
        assert (spec.trees, spec.depth, spec.features) == (500, 8, 100)


@pytest.mark.e2e  # the store checks a booster file in a child process
def test_a_missing_model_is_trained_and_registered_once(tmp_path: Path) -> None:
    root = tmp_path / "models"
    features = ensure_heavy(root, "tiny-lgbm", TINY["lightgbm"], backend="library")
    assert features == tuple(f"f{i}" for i in range(6))
    store = ModelStore(root)
    manifest = store.manifest("tiny-lgbm", 1)
    assert (manifest.family, manifest.format, manifest.classes) == ("lightgbm", "txt", (0, 1))
    assert manifest.backends["lightgbm"]["checks"]["probabilities"]["verified"]
    assert ensure_heavy(root, "tiny-lgbm", TINY["lightgbm"], backend="library") == features
    assert store.models() == {"tiny-lgbm": [1]}  # already there: not trained again


def test_a_spec_is_checked() -> None:
    with pytest.raises(ValueError, match="family"):
        Spec("sklearn")
    with pytest.raises(ValueError, match="features"):
        Spec("xgboost", features=1)
