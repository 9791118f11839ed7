"""The HTTP API in-process: answers, versions, the bad-input battery."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.core.runner import SwitchInterval
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES
from tests.support import probed_app, serve

pytestmark = pytest.mark.anyio

Q = "/predict?sepal_length=5.1&sepal_width=3.5&petal_length=1.4&petal_width=0.2"


async def test_query_predict_and_cache_header(session_store: Path) -> None:
    async with probed_app(session_store) as (client, probe, _):
        r = await client.get(Q)
        assert r.status_code == 200 and r.json() == {"prediction": "setosa"}
        assert r.headers["x-cache"] == "miss" and r.headers["content-type"] == "application/json"
        r = await client.get(Q.replace("5.1", "5.10"))
        assert r.json() == {"prediction": "setosa"} and r.headers["x-cache"] == "l1"
        assert probe.calls == 1
        zero = "/predict?sepal_length=5.1&sepal_width=3.5&petal_length=1.4&petal_width=0.0"
        assert (await client.get(zero)).headers["x-cache"] == "miss"
        r = await client.get(zero.replace("=0.0", "=-0.0"))
        assert r.headers["x-cache"] == "l1"  # -0.0 and 0.0 are one row
        r = await client.post("/v1/models/iris/predict", json={"instances": [
            {"petal_width": -0.0, "petal_length": 1.4, "sepal_width": 3.5, "sepal_length": 5.1}]})
        assert r.json()["cache"] == ["l1"]  # an object row shares the list row's key
        assert probe.calls == 2


async def test_v1_lists_and_objects_with_probabilities(session_store: Path, iris_rows,
                                                       iris_estimator) -> None:
    rows = iris_rows[::10]
    objects = [dict(zip(IRIS_FEATURES, map(float, r), strict=True)) for r in rows[:3]]
    async with probed_app(session_store) as (client, _, _):
        r = await client.post("/v1/models/iris/predict",
                              json={"instances": rows.tolist(), "probabilities": True})
        body = r.json()
        assert r.status_code == 200, body
        assert body["model"] == "iris" and body["version"] == "1"
        assert body["predictions"] == iris_estimator.predict(rows).tolist()
        assert np.allclose(body["probabilities"], iris_estimator.predict_proba(rows))
        assert body["classes"] == ["setosa", "versicolor", "virginica"]
        assert body["cache"] == ["miss"] * len(rows)
        r = await client.post("/v1/models/iris/predict", json={"instances": objects})
        assert r.json()["predictions"] == body["predictions"][:3]
        assert r.json()["cache"] == ["l1"] * 3


async def test_versions_are_addressable_and_latest_is_default(store_root: Path,
                                                              iris_estimator) -> None:
    from sklearn.dummy import DummyClassifier

    x = np.zeros((3, 4))
    dummy = DummyClassifier(strategy="constant", constant="virginica").fit(
        x, ["setosa", "versicolor", "virginica"])
    ModelStore(store_root).register(dummy, "iris", features=IRIS_FEATURES)
    row = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
    async with serve(_app(store_root)) as client:
        latest = (await client.post("/v1/models/iris/predict", json=row)).json()
        v1 = (await client.post("/v1/models/iris/predict", json={**row, "version": 1})).json()
        assert (latest["version"], latest["predictions"]) == ("2", ["virginica"])
        assert (v1["version"], v1["predictions"]) == ("1", ["setosa"])
        assert (await client.get(Q)).json() == {"prediction": "virginica"}
        models = (await client.get("/v1/models")).json()["models"]
        assert [m["name"] for m in models] == ["iris"]
        assert [v["version"] for v in models[0]["versions"]] == ["1", "2"]
        assert models[0]["features"] == list(IRIS_FEATURES)


def _app(root: Path, **kw: Any):
    from gateway import Settings, create_app

    return create_app(Settings(model_root=root, **kw))


async def test_health_ready_metrics_docs(session_store: Path) -> None:
    async with serve(_app(session_store)) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = (await client.get("/readyz")).json()
        assert ready == {"status": "ready", "models": {"iris": [1]},
                         "cache": {"l1": "ok", "l2": "off"},
                         "redis": {"iris": {"1": {
                             "consulted": False, "cross_replica": False,
                             "reason": "no Redis configured (GATEWAY_REDIS_URL)"}}}}
        await client.get(Q)
        text = (await client.get("/metrics")).text
        assert 'gateway_requests_total{route="/predict",status="200"} 1.0' in text
        assert 'gateway_model_calls_total{model="iris",version="1"} 1.0' in text
        schema = (await client.get("/openapi.json")).json()
        assert {"/predict", "/v1/models/{name}/predict", "/readyz"} <= set(schema["paths"])


async def test_empty_store_is_not_ready(tmp_path: Path) -> None:
    async with serve(_app(tmp_path)) as client:
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_ready"
        r = await client.get(Q)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


GOOD = [5.1, 3.5, 1.4, 0.2]
BAD_JSON_BODIES: list[tuple[str, Any, int, str]] = [
    ("wrong count", {"instances": [[1, 2, 3]]}, 422, "wrong_feature_count"),
    ("string", {"instances": [[1, "2", 3, 4]]}, 422, "not_a_number"),
    ("boolean", {"instances": [[1, True, 3, 4]]}, 422, "not_a_number"),
    ("null", {"instances": [[1, None, 3, 4]]}, 422, "not_a_number"),
    ("empty", {"instances": []}, 422, "empty_instances"),
    ("not a list", {"instances": {"a": 1}}, 422, "invalid_instances"),
    ("row not list", {"instances": [5]}, 422, "invalid_instances"),
    ("missing instances", {"rows": [GOOD]}, 422, "invalid_body"),
    ("unknown field", {"instances": [GOOD], "probabilty": True}, 422, "invalid_body"),
    ("not an object", [GOOD], 422, "invalid_body"),
    ("probabilities not bool", {"instances": [GOOD], "probabilities": "yes"}, 422,
     "invalid_body"),
    ("wrong names", {"instances": [{"a": 1, "b": 2, "c": 3, "d": 4}]}, 422, "wrong_features"),
    ("extra name", {"instances": [dict(zip(IRIS_FEATURES, GOOD, strict=True), x=1)]}, 422,
     "wrong_features"),
    ("unknown version", {"instances": [GOOD], "version": 9}, 404, "version_not_found"),
    ("bad version", {"instances": [GOOD], "version": "abc"}, 422, "invalid_version"),
    ("too many rows", {"instances": [GOOD] * 1025}, 422, "too_many_rows"),
]


@pytest.mark.parametrize(("case", "body", "status", "code"), BAD_JSON_BODIES,
                         ids=[c[0] for c in BAD_JSON_BODIES])
async def test_bad_json_input(session_store: Path, case: str, body: Any, status: int,
                              code: str) -> None:
    import orjson

    async with probed_app(session_store) as (client, probe, _):
        r = await client.post("/v1/models/iris/predict", content=orjson.dumps(body))
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        assert r.json()["error"]["message"]
        assert probe.calls == 0
        assert (await client.get("/readyz")).status_code == 200


RAW_BODIES = [
    ("malformed", b'{"instances": [[1,2,3,4]', 400, "malformed_json"),
    ("nan literal", b'{"instances": [[NaN, 1, 2, 3]]}', 400, "malformed_json"),
    ("infinity literal", b'{"instances": [[Infinity, 1, 2, 3]]}', 400, "malformed_json"),
    ("overflowing number", b'{"instances": [[1e999, 1, 2, 3]]}', 400, "malformed_json"),
    ("too large", b'{"instances": [' + b"[1,2,3,4]," * 200_000 + b"[1,2,3,4]]}", 413,
     "body_too_large"),
]


@pytest.mark.parametrize(("case", "content", "status", "code"), RAW_BODIES,
                         ids=[c[0] for c in RAW_BODIES])
async def test_bad_raw_body(session_store: Path, case: str, content: bytes, status: int,
                            code: str) -> None:
    async with probed_app(session_store) as (client, probe, _):
        r = await client.post("/v1/models/iris/predict", content=content)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code)
        assert probe.calls == 0


async def test_chunked_body_over_limit_is_refused_while_streaming(session_store: Path) -> None:
    sent = 0

    async def chunks():
        nonlocal sent
        for _ in range(100):
            sent += 1
            yield b" " * 1024

    async with probed_app(session_store, max_body_bytes=10_000) as (client, probe, _):
        r = await client.post("/v1/models/iris/predict", content=chunks())
        assert r.status_code == 413 and probe.calls == 0
        assert sent < 100


BAD_QUERIES = [
    ("missing", "sepal_length=5.1&sepal_width=3.5&petal_length=1.4", "wrong_features"),
    ("extra", Q[9:] + "&color=red", "wrong_features"),
    ("duplicate", Q[9:] + "&petal_width=1", "duplicate_feature"),
    ("string", Q[9:].replace("5.1", "abc"), "not_a_number"),
    ("empty", Q[9:].replace("5.1", ""), "not_a_number"),
    ("nan", Q[9:].replace("5.1", "nan"), "non_finite"),
    ("inf", Q[9:].replace("5.1", "-inf"), "non_finite"),
    ("overflow", Q[9:].replace("5.1", "1e999"), "non_finite"),
    ("none", "", "wrong_features"),
]


@pytest.mark.parametrize(("case", "query", "code"), BAD_QUERIES, ids=[c[0] for c in BAD_QUERIES])
async def test_bad_query(session_store: Path, case: str, query: str, code: str) -> None:
    async with probed_app(session_store) as (client, probe, _):
        r = await client.get(f"/predict?{query}")
        assert (r.status_code, r.json()["error"]["code"]) == (422, code), r.text
        assert probe.calls == 0


async def test_unknown_model_and_bad_timeout_header(session_store: Path) -> None:
    async with probed_app(session_store) as (client, probe, _):
        r = await client.post("/v1/models/nope/predict", json={"instances": [GOOD]})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
        r = await client.get(Q, headers={"X-Request-Timeout-Ms": "soon"})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_timeout")
        r = await client.get("/no/such/path")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert probe.calls == 0
        text = (await client.get("/metrics")).text
        assert 'gateway_rejected_total{reason="model_not_found"} 1.0' in text


async def test_the_gateway_takes_the_switch_interval_over_while_it_runs(
        session_store: Path) -> None:
    own = sys.getswitchinterval()
    async with probed_app(session_store, switch_interval_us=250):
        assert SwitchInterval.busy_s == pytest.approx(250e-6)
        assert SwitchInterval.idle_s == own
    assert SwitchInterval.busy_s is None and sys.getswitchinterval() == own
