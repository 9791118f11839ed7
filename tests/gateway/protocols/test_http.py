"""The doors answered ahead of FastAPI: matching, 405, bounded bodies, errors and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.protocols.http import Door, Reply, error_reply
from tests.support import probed_app

pytestmark = pytest.mark.anyio


async def _never(*_args: object) -> Reply:
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
    assert Door("POST", template, _never, error_reply).match(path) == params


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
