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
