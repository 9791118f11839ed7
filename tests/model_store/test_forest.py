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


@pytest.mark.anyio
@pytest.mark.parametrize(("backend", "fast"), [("sklearn", True), ("estimator", False)])
async def test_the_estimator_backend_calls_the_forest_itself(tmp_path: Path, backend: str,
                                                             fast: bool) -> None:
    from gateway.app import create_app
    from gateway.settings import Settings
    from tests.support import serve_with_state

    x, y = iris_data()
    ModelStore(tmp_path).register(RandomForestClassifier(n_estimators=10, random_state=0)
                                  .fit(x, y), "iris", features=IRIS_FEATURES, backend="sklearn")
    app = create_app(Settings(model_root=tmp_path, backend=backend))
    async with serve_with_state(app) as (client, gw):
        assert (gw.runtime("iris").model.forest is not None) is fast
        r = await client.post("/v1/models/iris/predict", json={"instances": x[:3].tolist()})
        assert r.json()["predictions"] == ["setosa"] * 3
