"""The doors answered ahead of FastAPI: matching, 405, bounded bodies, errors and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

from gateway.errors import GatewayError
from gateway.protocols.http import Decoded, Door, error_reply
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES, iris_data
from tests.support import probed_app

ROW = [5.1, 3.5, 1.4, 0.2]

pytestmark = pytest.mark.anyio


def _never(*_args: object) -> Any:
    raise AssertionError("not called")


@pytest.mark.parametrize(("template", "path", "params"), [
    ("/predict", "/predict", {}),
    ("/predict", "/predict/", None),
    ("/v1/models/{name}/predict", "/v1/models/iris/predict", {"name": "iris"}),
    ("/v1/models/{name}/predict", "/v1/models//predict", None),
    ("/v1/models/{name}:predict", "/v1/models/iris:predict", {"name": "iris"}),
    ("/v1/models/{name}:predict", "/v1/models/:predict", None),
    ("/v1/models/{name}/predict", "/v1/models/iris:predict", None),
    ("/v2/models/{name}/versions/{version}/infer", "/v2/models/m/versions/2/infer",
     {"name": "m", "version": "2"}),
])
def test_door_matches_its_template(template: str, path: str,
                                   params: dict[str, str] | None) -> None:
    assert Door("POST", template, _never, _never, error_reply).match(path) == params


def test_error_reply_carries_status_code_and_headers() -> None:
    class Busy(GatewayError):
        status = 503
        code = "busy"
        headers = {"Retry-After": "1"}  # noqa: RUF012

    reply = error_reply(Busy("try later"))
    assert reply.status == 503 and reply.body == b'{"error":{"code":"busy","message":"try later"}}'
    assert reply.headers == [(b"retry-after", b"1")]


async def test_wrong_method_on_a_door_is_405_in_the_doors_protocol(session_store: Path) -> None:
    async with probed_app(session_store) as (client, probe, _):
        r = await client.post("/predict")
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        assert r.json()["error"]["code"] == "method_not_allowed"
        r = await client.get("/v2/models/iris/infer")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert isinstance(r.json()["error"], str)
        assert probe.calls == 0


@pytest.mark.parametrize("length", ["12abc", "²", "1" * 40, "-5"])
async def test_malformed_content_length_is_a_4xx(session_store: Path, length: str) -> None:
    async with probed_app(session_store) as (client, probe, _):
        r = await client.post("/v1/models/iris/predict", content=b'{"instances": [[1,2,3,4]]}',
                              headers={"content-length": length.encode("latin-1"),
                                       "content-type": "application/json"})
        assert 400 <= r.status_code < 500
        assert probe.calls == 0


async def test_every_door_answer_is_counted_by_route_and_status(session_store: Path) -> None:
    async with probed_app(session_store) as (client, _, _):
        await client.get("/predict?sepal_length=5.1&sepal_width=3.5&petal_length=1.4"
                         "&petal_width=0.2")
        await client.get("/predict?sepal_length=x")
        await client.post("/v2/models/iris/infer", content=b"{")
        text = (await client.get("/metrics")).text
    assert 'gateway_requests_total{route="/predict",status="200"} 1.0' in text
    assert 'gateway_requests_total{route="/predict",status="422"} 1.0' in text
    assert 'gateway_requests_total{route="/v2/models/{name}/infer",status="400"} 1.0' in text


def test_decoded_memo_keeps_what_came_twice_and_is_bounded() -> None:
    memo = Decoded(max_entries=2, max_bytes=4)
    f = ("x",)
    for _ in range(2):
        memo.keep(b"big", 5, f, 0, np.zeros(1))  # too big to keep
    assert memo.find(b"big", 5) is None
    rows = np.zeros(1)
    memo.keep(b"a", 4, f, 1, rows)  # seen once: not kept
    assert memo.find(b"a", 4) is None and rows.flags.writeable
    for key, n in ((b"a", 1), (b"b", 2), (b"b", 2)):
        memo.keep(key, 4, f, n, rows)
    assert (memo.find(b"a", 4), memo.find(b"b", 4)) == ((f, 1), (f, 2))
    assert not rows.flags.writeable  # kept rows are read-only
    assert memo.find(b"a", 5) is None  # a request of that size is never looked for
    for _ in range(2):
        memo.keep(b"c", 4, f, 3, np.zeros(1))  # the second time, full: cleared first
    assert (memo.find(b"a", 4), memo.find(b"b", 4), memo.find(b"c", 4)) == (None, None, (f, 3))
    for key in (b"d", b"e", b"d"):  # the hashes seen are bounded too (cleared when full)
        memo.keep(key, 4, f, 4, np.zeros(1))
    assert memo.find(b"d", 4) is None


async def test_a_request_decoded_before_is_decoded_again_for_a_version_with_other_features(
        store_root: Path) -> None:
    """The same bytes, asked again after a new version reorders the features: every door
    answers from the new order, not from the rows it decoded for the old one."""
    x, y = iris_data()
    reordered = tuple(reversed(IRIS_FEATURES))
    query = "/predict?" + "&".join(f"{f}={v}" for f, v in zip(IRIS_FEATURES, ROW, strict=True))
    by_name = {"instances": [dict(zip(IRIS_FEATURES, ROW, strict=True))]}
    v2 = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
    async with probed_app(store_root, model_poll_s=0) as (client, _, gw):
        before = [(await client.get(query)).json()["prediction"],
                  (await client.post("/v1/models/iris/predict", json=by_name)).json(),
                  (await client.post("/v2/models/iris/infer", json=v2)).json()]
        assert before[0] == "setosa" and before[1]["predictions"] == ["setosa"]
        ModelStore(store_root).register(
            DecisionTreeClassifier(random_state=0).fit(x[:, ::-1], y), "iris",
            features=reordered, backend="sklearn")
        assert await gw.registry.reload()
        got = (await client.get(query)).json()["prediction"]
        assert got == "setosa"  # named parameters: the same row in the new order
        v1 = (await client.post("/v1/models/iris/predict", json=by_name)).json()
        assert (v1["version"], v1["predictions"]) == ("2", ["setosa"])
        # A positional tensor now means the reversed row, a virginica-like flower.
        out = (await client.post("/v2/models/iris/infer", json=v2)).json()
        label = next(o for o in out["outputs"] if o["name"] == "label")["data"]
        expected = DecisionTreeClassifier(random_state=0).fit(x[:, ::-1], y).predict(
            np.array([ROW]))
        assert (out["model_version"], label) == ("2", expected.tolist())
