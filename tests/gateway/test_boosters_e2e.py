"""XGBoost and LightGBM models through every door of the in-process gateway: the same answers
as the library's own predict, with a scikit-learn model's semantics (labels, probabilities per
class summing to 1, regression values). Served by the library's own fast path here
(``backend="library"``); a compiled candidate through the gateway is in ``test_backends.py``.
Registering a booster file loads it in a child process first, hence ``e2e``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import lightgbm as lgb
import numpy as np
import orjson
import pytest
import xgboost as xgb

from gateway import Settings, create_app
from model_store import ModelStore
from tests.support import serve

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

N_FEATURES = 10
NAMES = [f"c{i}" for i in range(N_FEATURES)]
CLASSES = ["low", "mid", "high"]

Answers = tuple[list[Any], np.ndarray | None]  # labels or values, probabilities


@pytest.fixture(scope="module")
def booster_store(tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[Path, dict[str, Callable[[np.ndarray], Answers]]]:
    """``xgb``: a native UBJSON multi-class booster with feature names and named classes;
    ``lgb``: a pickled binary LGBMClassifier; ``lgbreg``: a LightGBM text regressor. With
    each, the library's own answers."""
    root = tmp_path_factory.mktemp("boosters")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, N_FEATURES))
    signal = x[:, 0] + 0.5 * x[:, 1] - x[:, 2]
    store = ModelStore(root)

    booster = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 3},
                        xgb.DMatrix(x, label=np.digitize(signal, [-0.7, 0.7]),
                                    feature_names=NAMES), 20)
    path = root.parent / "multi.ubj"
    booster.save_model(str(path))
    store.register(path, "xgb", classes=CLASSES, backend="library")

    def xgb_own(rows: np.ndarray) -> Answers:
        mine = xgb.Booster(model_file=str(path))
        proba = np.asarray(mine.predict(xgb.DMatrix(rows, feature_names=NAMES)), dtype=float)
        return np.asarray(CLASSES)[np.argmax(proba, axis=1)].tolist(), proba

    wrapper = lgb.LGBMClassifier(n_estimators=20, num_leaves=8, verbose=-1).fit(
        x, (signal > 0).astype(int))
    pickled = root.parent / "binary.joblib"
    joblib.dump(wrapper, pickled)
    store.register(joblib.load(pickled), "lgb", features=NAMES, backend="library")

    def lgb_own(rows: np.ndarray) -> Answers:
        return wrapper.predict(rows).tolist(), wrapper.predict_proba(rows)

    regressor = lgb.train({"objective": "regression", "num_leaves": 8, "verbose": -1},
                          lgb.Dataset(x, label=3 * signal), 20)
    text = root.parent / "regression.txt"
    regressor.save_model(str(text))
    store.register(text, "lgbreg", features=NAMES, backend="library")

    def reg_own(rows: np.ndarray) -> Answers:
        return lgb.Booster(model_file=str(text)).predict(rows).tolist(), None

    return root, {"xgb": xgb_own, "lgb": lgb_own, "lgbreg": reg_own}


def _binary_body(rows: np.ndarray, outputs: list[dict[str, Any]]) -> tuple[bytes, str]:
    data = rows.astype("<f8").tobytes()
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(rows.shape),
                                       "datatype": "FP64",
                                       "parameters": {"binary_data_size": len(data)}}],
                           "outputs": outputs})
    return header + data, str(len(header))


@pytest.mark.parametrize("name", ["xgb", "lgb", "lgbreg"])
async def test_every_door_answers_as_the_library(
        booster_store: tuple[Path, dict[str, Callable[[np.ndarray], Answers]]],
        name: str) -> None:
    root, own = booster_store
    manifest = ModelStore(root).manifest(name, 1)
    family = manifest.family
    regression = manifest.task == "regression"
    rows = np.random.default_rng(1).normal(scale=1.5, size=(40, N_FEATURES))
    want, want_proba = own[name](rows)
    atol = 0.0 if regression else manifest.backends[family]["checks"]["probabilities"]["atol"]

    def same_values(got: list[Any]) -> None:
        if regression:  # within the tolerance verification applied
            rtol = manifest.backends[family]["checks"]["label"]["rtol"]
            scale = max(1.0, float(np.max(np.abs(want))))
            assert np.max(np.abs(np.asarray(got) - np.asarray(want))) <= rtol * scale
        else:
            assert got == want  # labels exactly

    def same_proba(got: Any) -> None:
        assert want_proba is not None
        proba = np.asarray(got, dtype=float).reshape(want_proba.shape)
        assert np.max(np.abs(proba - want_proba)) <= atol
        assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-6)

    app = create_app(Settings(model_root=root, default_model=name, cache="off"))
    async with serve(app) as client:
        # GET /predict: the default model, one row per request
        for i in range(5):
            r = await client.get("/predict", params={f: repr(float(v))
                                                     for f, v in zip(NAMES, rows[i],
                                                                     strict=True)})
            assert r.status_code == 200, r.text
            same_values_row = r.json()["prediction"]
            if regression:
                assert abs(same_values_row - want[i]) <= 1e-5 * max(1.0, abs(want[i]))
            else:
                assert same_values_row == want[i]

        # /v1: the gateway's own, with probabilities, rows as lists and as objects
        body: dict[str, Any] = {"instances": rows.tolist(), "probabilities": not regression}
        r = await client.post(f"/v1/models/{name}/predict", json=body)
        assert r.status_code == 200, r.text
        same_values(r.json()["predictions"])
        if not regression:
            same_proba(r.json()["probabilities"])
        objects = [dict(zip(NAMES, row, strict=True)) for row in rows.tolist()]
        r = await client.post(f"/v1/models/{name}/predict", json={"instances": objects})
        same_values(r.json()["predictions"])

        # KServe V1
        meta = (await client.get(f"/v2/models/{name}")).json()
        assert meta["platform"] == family  # xgboost or lightgbm, as the manifest says
        r = await client.post(f"/v1/models/{name}:predict", json={"instances": rows.tolist()})
        assert r.status_code == 200, r.text
        same_values(r.json()["predictions"])

        # Open Inference Protocol (V2), JSON
        r = await client.post(f"/v2/models/{name}/infer", json={
            "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP64",
                        "data": rows.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        outputs = {o["name"]: o for o in r.json()["outputs"]}
        if regression:
            assert outputs["prediction"]["datatype"] == "FP64"
            same_values(outputs["prediction"]["data"])
        else:
            same_values(outputs["label"]["data"])
            assert outputs["probabilities"]["shape"] == [len(rows), len(want_proba[0])]
            same_proba(outputs["probabilities"]["data"])

        # V2 binary tensors, in and out
        wanted = ["prediction"] if regression else ["label", "probabilities"]
        content, length = _binary_body(rows, [
            {"name": o, "parameters": {"binary_data": o != "label"}} for o in wanted])
        r = await client.post(f"/v2/models/{name}/infer", content=content,
                              headers={"Inference-Header-Content-Length": length})
        assert r.status_code == 200, r.text
        head_len = int(r.headers["inference-header-content-length"])
        head = orjson.loads(r.content[:head_len])
        blob = r.content[head_len:]
        outputs = {o["name"]: o for o in head["outputs"]}
        binary = np.frombuffer(blob, dtype="<f8")
        if regression:
            same_values(binary.tolist())
        else:
            same_values(outputs["label"]["data"])
            same_proba(binary)

        # what serves it is reported
        meta = (await client.get(f"/v2/models/{name}")).json()
        served = {"label": family} if regression else {"label": family,
                                                       "probabilities": family}
        assert meta["parameters"]["backends"] == served
        assert meta["parameters"]["features"] == NAMES
        models = (await client.get("/v1/models")).json()["models"]
        assert {m["name"] for m in models} == {"xgb", "lgb", "lgbreg"}


@pytest.mark.parametrize("backend", ["sklearn", "estimator"])
async def test_the_library_own_predict_serves_the_same_under_other_backends(
        booster_store: tuple[Path, dict[str, Callable[[np.ndarray], Answers]]],
        backend: str) -> None:
    root, own = booster_store
    rows = np.random.default_rng(2).normal(scale=1.5, size=(40, N_FEATURES))
    app = create_app(Settings(model_root=root, backend=backend, cache="off"))
    async with serve(app) as client:
        for name in ("xgb", "lgb"):
            want, want_proba = own[name](rows)
            r = await client.post(f"/v1/models/{name}/predict",
                                  json={"instances": rows.tolist(), "probabilities": True})
            assert r.json()["predictions"] == want
            assert want_proba is not None
            assert np.max(np.abs(np.asarray(r.json()["probabilities"]) - want_proba)) <= 1e-6
