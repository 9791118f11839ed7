"""Regression tests for the defects the attack found in the request path, at HTTP level,
in-process (uncaught exceptions come back as the 500 a server would send).

Cache keys are never computed here: a value is forged by making a request, then overwriting
whatever keys appeared under the test's own prefix in the test session's redis-server.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis

from model_store.demo import IRIS_FEATURES
from tests.hardening.inproc import forge, gateway_client, wait_for_keys
from tests.hardening.procs import metric
from tests.support import ProbeLoader, wait_thread_event

pytestmark = pytest.mark.anyio


ROW = [6.3, 3.3, 6.0, 2.5]  # virginica; ONNX's float32 sums give 0.00999999977... not 0.01
QUERY = "/predict?" + "&".join(f"{n}={v}" for n, v in zip(IRIS_FEATURES, ROW, strict=True))
V1 = "/v1/models/iris/predict"
V2 = "/v2/models/iris/infer"


def _v2_body(rows: list[list[float]], outputs: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "input", "shape": [len(rows), 4],
                                        "datatype": "FP64", "data": rows}]}
    if outputs is not None:
        body["outputs"] = [{"name": o} for o in outputs]
    return body


def _v2_outputs(body: dict[str, Any]) -> dict[str, Any]:
    return {o["name"]: o for o in body["outputs"]}


# -- 1. numeric headers ------------------------------------------------------------------------
BAD_NUMBERS = [b"\xb2", b"1" * 5000]  # a latin-1 superscript two; past int()'s digit limit


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=["superscript-two", "5000-digits"])
async def test_bad_timeout_header_is_a_4xx_on_every_front_door(session_store: Path,
                                                               value: bytes) -> None:
    header = [(b"x-request-timeout-ms", value)]
    async with gateway_client(session_store) as client:
        r = await client.get(QUERY, headers=header)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_timeout", r.text
        r = await client.post(V1, json={"instances": [ROW]}, headers=header)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_timeout", r.text
        r = await client.post(V2, json=_v2_body([ROW]), headers=header)
        assert r.status_code == 400 and isinstance(r.json()["error"], str), r.text


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=["superscript-two", "5000-digits"])
async def test_bad_inference_header_content_length_is_400(session_store: Path,
                                                          value: bytes) -> None:
    async with gateway_client(session_store) as client:
        r = await client.post(V2, content=orjson.dumps(_v2_body([ROW])),
                              headers=[(b"inference-header-content-length", value)])
        assert r.status_code == 400 and isinstance(r.json()["error"], str), r.text


# -- 2. values read from Redis are validated ---------------------------------------------------
FORGED = {
    # name: (forged bytes, the request that creates the key and reads it back)
    "garbage-v1": (b"\x80garbage", "v1"),
    "garbage-get": (b"\x80garbage", "get"),
    "garbage-v2": (b"\x80garbage", "v2-label"),
    "strings-as-probabilities": (b'["a","b","c"]', "v2-proba"),
    "two-probabilities-for-three-classes": (b"[0.5,0.5]", "v2-proba"),
    "a-label-the-model-does-not-have": (b'"HACKED <script>"', "v1"),
}


async def _ask(client: Any, kind: str) -> tuple[Any, str | None]:
    """(answer, cache source or None) for ROW through one front door."""
    if kind == "get":
        r = await client.get(QUERY)
        assert r.status_code == 200, r.text
        return r.json()["prediction"], r.headers["x-cache"]
    if kind == "v1":
        r = await client.post(V1, json={"instances": [ROW]})
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0], r.json()["cache"][0]
    output = "label" if kind == "v2-label" else "probabilities"
    r = await client.post(V2, json=_v2_body([ROW], [output]))
    assert r.status_code == 200, r.text
    out = _v2_outputs(r.json())[output]
    assert out["shape"][0] == 1 and len(out["data"]) == int(np.prod(out["shape"])), r.text
    return out["data"], None


@pytest.mark.parametrize("case", list(FORGED))
async def test_a_forged_redis_value_is_a_miss_answered_by_the_model(
    session_store: Path, redis_server: Any, iris_estimator: Any, case: str
) -> None:
    value, kind = FORGED[case]
    prefix = f"forged-{uuid.uuid4().hex[:8]}"
    settings = {"redis_url": f"redis://{redis_server.host}:{redis_server.port}/0",
                "cache_prefix": prefix, "l2_min_call_us": 0, "backend": "sklearn"}
    expected: Any = (iris_estimator.predict_proba([ROW])[0].tolist() if kind == "v2-proba"
                     else iris_estimator.predict([ROW]).tolist())
    if kind in ("get", "v1"):
        expected = expected[0]
    r = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        async with gateway_client(session_store, **settings) as writer:
            assert (await _ask(writer, kind))[0] == expected
            await forge(r, prefix, value)
        async with gateway_client(session_store, **settings) as reader:  # an empty L1
            answer, source = await _ask(reader, kind)
            assert answer == expected
            if source is not None:
                assert source == "miss"
                answer, source = await _ask(reader, kind)
                assert (answer, source) == (expected, "l1")  # the model's answer, not the forgery
    finally:
        await r.aclose()


async def test_with_a_cache_secret_an_untagged_or_foreign_value_is_a_miss(
    session_store: Path, redis_server: Any
) -> None:
    prefix = f"tagged-{uuid.uuid4().hex[:8]}"
    settings = {"redis_url": f"redis://{redis_server.host}:{redis_server.port}/0",
                "cache_prefix": prefix, "l2_min_call_us": 0, "backend": "sklearn"}
    r = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        async with gateway_client(session_store, cache_secret="s3cret-key", **settings) as a:
            assert (await _ask(a, "v1")) == ("virginica", "miss")
        await wait_for_keys(r, prefix)
        async with gateway_client(session_store, cache_secret="s3cret-key", **settings) as a:
            assert (await _ask(a, "v1")) == ("virginica", "l2")  # its own tag verifies
        await forge(r, prefix, b'"setosa"')  # a valid label, without a tag
        async with gateway_client(session_store, cache_secret="s3cret-key", **settings) as a:
            assert (await _ask(a, "v1")) == ("virginica", "miss")
        foreign = f"{prefix}-x"
        other = {**settings, "cache_prefix": foreign}
        async with gateway_client(session_store, cache_secret="another-key", **other) as b:
            assert (await _ask(b, "v1"))[0] == "virginica"
        await wait_for_keys(r, foreign)
        async with gateway_client(session_store, cache_secret="s3cret-key", **other) as a:
            assert (await _ask(a, "v1")) == ("virginica", "miss")
    finally:
        await r.aclose()


async def test_without_a_secret_a_value_under_another_rows_key_is_a_miss(
    session_store: Path, redis_server: Any
) -> None:
    prefix = f"misplaced-{uuid.uuid4().hex[:8]}"
    settings = {"redis_url": f"redis://{redis_server.host}:{redis_server.port}/0",
                "cache_prefix": prefix, "l2_min_call_us": 0, "backend": "sklearn"}
    setosa = [5.1, 3.5, 1.4, 0.2]
    r = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        async with gateway_client(session_store, **settings) as writer:
            assert (await writer.post(V1, json={"instances": [ROW]})).json()["predictions"] == [
                "virginica"]
            (virginica_key,) = await wait_for_keys(r, prefix)
            await writer.post(V1, json={"instances": [setosa]})
            keys = await wait_for_keys(r, prefix, 2)
        (setosa_key,) = set(keys) - {virginica_key}
        await r.set(setosa_key, await r.get(virginica_key), ex=600)  # a valid answer, misplaced
        async with gateway_client(session_store, **settings) as reader:  # an empty L1
            got = (await reader.post(V1, json={"instances": [setosa]})).json()
            assert (got["predictions"], got["cache"]) == (["setosa"], ["miss"])
            scraped = (await reader.get("/metrics")).text
            assert metric(scraped, "gateway_cache_lookups_total", tier="l2",
                          result="invalid") == 1
            got = (await reader.post(V1, json={"instances": [ROW]})).json()
            assert (got["predictions"], got["cache"]) == (["virginica"], ["l2"])  # in place
    finally:
        await r.aclose()


async def test_an_entry_of_the_older_unbound_format_is_a_miss_never_an_answer(
    session_store: Path, redis_server: Any
) -> None:
    prefix = f"oldformat-{uuid.uuid4().hex[:8]}"
    settings = {"redis_url": f"redis://{redis_server.host}:{redis_server.port}/0",
                "cache_prefix": prefix, "l2_min_call_us": 0, "backend": "sklearn"}
    r = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        async with gateway_client(session_store, **settings) as writer:
            await writer.post(V1, json={"instances": [ROW]})
        # What the older format stored: the bare value (label and probabilities of one call)
        await forge(r, prefix, b'"setosa"\x00[1.0,0.0,0.0]')
        async with gateway_client(session_store, **settings) as reader:
            got = (await reader.post(V1, json={"instances": [ROW]})).json()
            assert (got["predictions"], got["cache"]) == (["virginica"], ["miss"])
    finally:
        await r.aclose()


# -- 3. the backend is part of the key ---------------------------------------------------------
async def test_onnx_and_sklearn_gateways_on_one_redis_never_share_entries(
    compiled_store: Path, redis_server: Any, iris_estimator: Any
) -> None:
    prefix = f"backends-{uuid.uuid4().hex[:8]}"
    settings = {"redis_url": f"redis://{redis_server.host}:{redis_server.port}/0",
                "cache_prefix": prefix, "l2_min_call_us": 0}
    body = {"instances": [ROW], "probabilities": True}
    r = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        async with gateway_client(compiled_store, **settings) as onnx:
            first = (await onnx.post(V1, json=body)).json()
            assert first["probabilities"][0] != iris_estimator.predict_proba([ROW])[0].tolist()
        await wait_for_keys(r, prefix, 1)  # labels and probabilities: one entry
        async with gateway_client(compiled_store, backend="sklearn", **settings) as sk:
            got = (await sk.post(V1, json=body)).json()
            assert got["cache"] == ["miss"]
            assert got["probabilities"][0] == iris_estimator.predict_proba([ROW])[0].tolist()
    finally:
        await r.aclose()


# -- 7. smaller ones ---------------------------------------------------------------------------
class _UnencodableLabels:
    """An estimator whose labels cannot be written as JSON: answering them fails unexpectedly."""

    def __init__(self, estimator: Any) -> None:
        self.n_features_in_ = estimator.n_features_in_
        self.classes_ = estimator.classes_

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), dtype=object)
        out[:] = [object() for _ in range(len(x))]
        return out


async def test_get_predict_500s_are_counted(store_root: Path) -> None:
    def loader(path: Path) -> Any:
        return _UnencodableLabels(joblib.load(path))

    async with gateway_client(store_root, loader=loader, backend="sklearn") as client:
        assert (await client.get(QUERY)).status_code == 500
        text = (await client.get("/metrics")).text
        assert metric(text, "gateway_requests_total", route="/predict", status="500") == 1


@pytest.mark.parametrize("value", ["5_1", "\uff15.\uff11", " 5.1", "5.1 "],
                         ids=["underscore", "fullwidth-digits", "leading-space", "trailing-space"])
async def test_query_numbers_use_the_json_number_grammar(session_store: Path,
                                                         value: str) -> None:
    params = dict(zip(IRIS_FEATURES, map(str, ROW), strict=True))
    params["sepal_length"] = value
    async with gateway_client(session_store) as client:
        r = await client.get("/predict", params=params)
        assert r.status_code == 422, r.text


@pytest.mark.parametrize("version", ["\uff11", " 1", "1 ", "+1"],
                         ids=["fullwidth-one", "leading-space", "trailing-space", "plus-sign"])
async def test_version_accepts_ascii_digits_only(session_store: Path, version: str) -> None:
    async with gateway_client(session_store) as client:
        r = await client.post(V1, json={"instances": [ROW], "version": version})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_version", r.text
        r = await client.post(f"/v2/models/iris/versions/{version}/infer", json=_v2_body([ROW]))
        assert r.status_code == 400, r.text


@pytest.mark.parametrize("body", [
    b'{"instances": [[6.3, 3.3, 6.0, 2.5]], "instances": [[5.1, 3.5, 1.4, 0.2]]}',
    b'{"instances": [{"sepal_length": 6.3, "sepal_length": 5.1, "sepal_width": 3.3,'
    b' "petal_length": 6.0, "petal_width": 2.5}]}',
], ids=["top-level", "in-a-row"])
async def test_duplicate_json_keys_are_refused_on_v1(session_store: Path, body: bytes) -> None:
    async with gateway_client(session_store) as client:
        r = await client.post(V1, content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), r.text


async def test_duplicate_json_keys_are_refused_on_v2(session_store: Path) -> None:
    one = orjson.dumps(_v2_body([ROW]))[1:-1]
    async with gateway_client(session_store) as client:
        r = await client.post(V2, content=b"{" + one + b"," + one + b"}")
        assert r.status_code == 400, r.text


@pytest.mark.parametrize("batch", ["on", "off"])
async def test_more_uncached_rows_than_the_queue_holds_get_413_naming_the_limit(
    session_store: Path, random_rows: np.ndarray, batch: str
) -> None:
    async with gateway_client(session_store, max_queue_rows=8, batch=batch,
                              execution="thread", backend="sklearn") as client:
        r = await client.post(V1, json={"instances": random_rows[:16].tolist()})
        assert r.status_code == 413, r.text
        assert "8" in r.json()["error"]["message"], r.text
        ok = await client.post(V1, json={"instances": random_rows[:8].tolist()})
        assert ok.status_code == 200, ok.text


async def test_queue_limit_holds_without_batching(session_store: Path,
                                                  random_rows: np.ndarray) -> None:
    """With ``GATEWAY_BATCH=off`` and the model held, 8 rows wait; 4 more are refused at once
    with 503 and ``Retry-After``."""
    loader = ProbeLoader()
    async with gateway_client(session_store, loader=loader, max_queue_rows=8, batch="off",
                              execution="thread", backend="sklearn") as client:
        probe = loader.latest()
        probe.gate.clear()
        try:
            waiting = [asyncio.ensure_future(client.post(
                V1, json={"instances": random_rows[i:i + 4].tolist()})) for i in (0, 4)]
            await wait_thread_event(probe.entered)
            third = asyncio.ensure_future(client.post(
                V1, json={"instances": random_rows[8:12].tolist()}))
            done, _ = await asyncio.wait({third}, timeout=3)  # refused at once, or not at all
            assert third in done, "the third request was queued past the limit"
            r = third.result()
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        finally:
            probe.gate.set()
        assert [w.status_code for w in await asyncio.gather(*waiting)] == [200, 200]
        if not third.done():
            await third


@pytest.mark.parametrize("backend", ["sklearn", "auto"])
@pytest.mark.parametrize("value", [1e300, -3.5e38], ids=["1e300", "-3.5e38"])
async def test_values_beyond_float32_range_are_a_4xx(compiled_store: Path, backend: str,
                                                    value: float) -> None:
    """Tree models compare float32 values: a finite float64 beyond float32's range makes
    scikit-learn raise (answered 500 ``model_error``) and the compiled model see infinity
    (answered 200). Found by the schemathesis run; either way it is bad input."""
    row = [value, 3.3, 6.0, 2.5]
    params = dict(zip(IRIS_FEATURES, map(str, row), strict=True))
    async with gateway_client(compiled_store, backend=backend) as client:
        r = await client.get("/predict", params=params)
        assert r.status_code == 422, r.text
        r = await client.post(V1, json={"instances": [row]})
        assert r.status_code == 422, r.text
