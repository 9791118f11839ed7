"""The forest fast path: the estimator's own probabilities and labels, bit for bit, or not
used at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model_store import ModelStore
from model_store.compiled import verification_rows
from model_store.demo import IRIS_FEATURES, iris_data
from model_store.forest import forest_proba


@pytest.mark.parametrize("forest", [RandomForestClassifier(n_estimators=30, random_state=0),
                                    ExtraTreesClassifier(n_estimators=30, random_state=0)])
def test_forest_probabilities_are_the_estimators_bit_for_bit(forest: object) -> None:
    x, y = iris_data()
    est = forest.fit(x, y)  # type: ignore[attr-defined]
    fast = forest_proba(est, verification_rows(est, 4, generated=500))
    assert fast is not None
    rows = np.vstack([verification_rows(est, 4, x, generated=3000, seed=7), x])
    assert np.array_equal(fast.predict_proba(rows), est.predict_proba(rows))


@pytest.mark.parametrize("estimator", [
    GradientBoostingClassifier(n_estimators=5, random_state=0),
    make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=5, random_state=0)),
])
def test_anything_else_keeps_its_own_predict_proba(estimator: object) -> None:
    x, y = iris_data()
    est = estimator.fit(x, y)  # type: ignore[attr-defined]
    assert forest_proba(est, x) is None


def test_a_loaded_forest_answers_as_its_estimator(tmp_path: Path) -> None:
    x, y = iris_data()
    est = RandomForestClassifier(n_estimators=20, random_state=0).fit(x, y)
    store = ModelStore(tmp_path)
    store.register(est, "iris", features=IRIS_FEATURES, backend="sklearn")
    model = store.load_sync("iris", 1)
    assert model.forest is not None
    rows = verification_rows(est, 4, x, generated=2000, seed=3)
    assert model.predict(rows, prefer_compiled=False) == est.predict(rows).tolist()
    assert model.predict_proba(rows, prefer_compiled=False) == est.predict_proba(rows).tolist()
    labels, proba = model.predict_both(rows, prefer_compiled=False)
    assert labels == est.predict(rows).tolist() and proba == est.predict_proba(rows).tolist()
