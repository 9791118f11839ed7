"""The compiled backend behind the HTTP path: same answers, reported per output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway import Settings, create_app
from tests.support import serve

pytestmark = pytest.mark.anyio


async def test_served_answers_are_identical_between_backends(
        compiled_store: Path, iris_rows: np.ndarray) -> None:
    rows = np.vstack([iris_rows,
                      np.round(np.random.default_rng(9).uniform(0, 8, (10_000, 4)), 3)])
    answers = {}
    for backend in ("auto", "sklearn"):
        app = create_app(Settings(model_root=compiled_store, backend=backend, cache="off",
                                  max_rows=2048))
        async with serve(app) as client:
            labels: list[str] = []
            probs: list[list[float]] = []
            for start in range(0, len(rows), 2000):
                r = await client.post("/v1/models/iris/predict", json={
                    "instances": rows[start:start + 2000].tolist(), "probabilities": True})
                assert r.status_code == 200
                labels += r.json()["predictions"]
                probs += r.json()["probabilities"]
            models = (await client.get("/v1/models")).json()["models"]
            meta = (await client.get("/v2/models/iris")).json()
            metrics = (await client.get("/metrics")).text
        answers[backend] = (labels, np.asarray(probs), models, meta, metrics)
    compiled, sklearn = answers["auto"], answers["sklearn"]
    assert compiled[0] == sklearn[0]  # zero labels changed
    assert np.abs(compiled[1] - sklearn[1]).max() <= 1e-6
    assert compiled[2][0]["versions"][0]["backends"] == {"label": "onnx",
                                                         "probabilities": "onnx"}
    assert sklearn[2][0]["versions"][0]["backends"] == {"label": "sklearn",
                                                        "probabilities": "sklearn"}
    assert compiled[3]["parameters"]["backends"]["label"] == "onnx"
    assert 'gateway_model_exec_total{model="iris",place="inline",version="1"}' in compiled[4]


async def test_tiny_model_answers_misses_inline_without_the_batcher(
        compiled_store: Path, random_rows: np.ndarray, iris_estimator) -> None:
    from tests.support import serve_with_state

    # Thresholds far above the compiled model's microseconds, so no machine load flips them.
    app = create_app(Settings(model_root=compiled_store, inline_max_us=10_000))
    names = ("sepal_length", "sepal_width", "petal_length", "petal_width")
    async with serve_with_state(app) as (client, gw):
        rt = gw.runtime("iris")
        answers = []
        for row in random_rows[:40]:
            r = await client.get("/predict", params=dict(zip(names, map(float, row),
                                                             strict=True)))
            assert r.headers["x-cache"] == "miss"
            answers.append(r.json()["prediction"])
        assert answers == iris_estimator.predict(random_rows[:40]).tolist()
        assert rt.executor.measured and rt.executor.inline_for(1)
        metrics = (await client.get("/metrics")).text
    inline = [line for line in metrics.splitlines()
              if line.startswith('gateway_model_exec_total{model="iris",place="inline"')]
    assert inline and float(inline[0].rsplit(" ", 1)[1]) >= 30


@pytest.mark.e2e  # registering a booster file and compiling it start child processes
async def test_a_booster_served_by_a_compiled_candidate_answers_as_its_library(
        tmp_path: Path) -> None:
    import lightgbm as lgb
    import xgboost as xgb

    from model_store import ModelStore

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6))
    signal = x[:, 0] - x[:, 1] + 0.3 * rng.normal(size=600)
    text, js = tmp_path / "binary.txt", tmp_path / "regression.json"
    lgb.train({"objective": "binary", "num_leaves": 8, "verbose": -1},
              lgb.Dataset(x, label=(signal > 0).astype(int)), 20).save_model(str(text))
    xgb.train({"objective": "reg:squarederror", "max_depth": 3},
              xgb.DMatrix(x, label=3 * signal), 20).save_model(str(js))
    root = tmp_path / "models"
    store = ModelStore(root)
    # Asked for by name, each serves what it verifies, whatever the clock says.
    store.register(text, "lgb", backend="treelite", settings={"threads": 1})
    store.register(js, "xgb", backend="onnx")
    rows = rng.normal(scale=1.5, size=(300, 6))
    proba = lgb.Booster(model_file=str(text)).predict(rows)
    want = {"lgb": ((proba > 0.5).astype(int).tolist(), np.vstack((1 - proba, proba)).T),
            "xgb": (xgb.Booster(model_file=str(js)).predict(xgb.DMatrix(rows)), None)}
    served = {}
    for backend in ("auto", "sklearn"):
        app = create_app(Settings(model_root=root, backend=backend, cache="off"))
        async with serve(app) as client:
            for name, (labels, probabilities) in want.items():
                r = await client.post(f"/v1/models/{name}/predict", json={
                    "instances": rows.tolist(), "probabilities": probabilities is not None})
                assert r.status_code == 200, r.text
                got = r.json()
                if probabilities is None:  # within the tolerance the manifest states
                    rtol = store.manifest(name, 1).backends["onnx"]["checks"]["label"]["rtol"]
                    scale = max(1.0, float(np.max(np.abs(labels))))
                    assert np.max(np.abs(np.asarray(got["predictions"]) - labels)) <= \
                        rtol * scale
                else:
                    assert got["predictions"] == labels
                    assert np.max(np.abs(np.asarray(got["probabilities"]) - probabilities)) \
                        <= 1e-6
            models = {m["name"]: m["versions"][0]
                      for m in (await client.get("/v1/models")).json()["models"]}
            meta = (await client.get("/v2/models/lgb")).json()
        served[backend] = ({n: v["backends"] for n, v in models.items()},
                           meta["parameters"]["backends"])
        assert models["lgb"]["settings"]["threads"] == 1  # a booster's threads are shown
        assert models["xgb"]["settings"]["threads"] == 1
    assert served["auto"] == ({"lgb": {"label": "treelite", "probabilities": "treelite"},
                               "xgb": {"label": "onnx"}},
                              {"label": "treelite", "probabilities": "treelite"})
    assert served["sklearn"][0] == {"lgb": {"label": "lightgbm", "probabilities": "lightgbm"},
                                    "xgb": {"label": "xgboost"}}


async def test_a_scikit_learn_model_has_no_threads_setting(compiled_store: Path) -> None:
    async with serve(create_app(Settings(model_root=compiled_store, cache="off"))) as client:
        models = (await client.get("/v1/models")).json()["models"]
    assert "threads" not in models[0]["versions"][0]["settings"]
