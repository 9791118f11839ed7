"""The ``/v1`` doors: KServe's V1 data plane, shaped as KServe's own sklearn iris example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import probed_app

pytestmark = pytest.mark.anyio

KSERVE_EXAMPLE = {"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}


async def test_kserve_v1_predict_and_status(session_store: Path, iris_estimator: Any) -> None:
    async with probed_app(session_store) as (client, _, _):
        r = await client.post("/v1/models/iris:predict", json=KSERVE_EXAMPLE)
        assert r.status_code == 200
        assert r.json() == {"predictions": iris_estimator.predict(
            KSERVE_EXAMPLE["instances"]).tolist()}
        own = await client.post("/v1/models/iris/predict", json=KSERVE_EXAMPLE)
        assert own.json()["predictions"] == r.json()["predictions"]
        assert own.json()["cache"] == ["l1", "l1"]  # one pipeline under both doors
        assert (await client.get("/v1/models/iris")).json() == {"name": "iris", "ready": True}


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/models/nope:predict", KSERVE_EXAMPLE, 404),
    ("/v1/models/iris:predict", {"instances": [[1, 2]]}, 422),
    ("/v1/models/iris:predict", {"inputs": [[1, 2, 3, 4]]}, 422),
    ("/v1/models/iris:predict", {"instances": [[1, 2, 3, 4]], "extra": 1}, 422),
])
async def test_kserve_v1_errors(session_store: Path, path: str, body: Any, status: int) -> None:
    async with probed_app(session_store) as (client, probe, _):
        r = await client.post(path, json=body)
        assert r.status_code == status and "error" in r.json()
        assert probe.calls == 0
    async with probed_app(session_store) as (client, _, _):
        assert (await client.get("/v1/models/nope")).status_code == 404


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"instances": [[1, 2, 3, 4]], "version": 99, "probabilities": "yes"}, 422,
     "invalid_body"),  # the body's own fault is named before the version is looked up
    ({"instances": [[1, 2, 3, 4]], "version": 99}, 404, None),
    ({"instances": [[1, 2, 3]], "probabilities": True}, 422, "wrong_feature_count"),
    ({"instances": [[1, 2, 3, 4], [1, 2, 3]]}, 422, "wrong_feature_count"),
    ({"instances": [[1, 2, 3, True]]}, 422, "not_a_number"),
])
async def test_v1_errors_are_named_in_the_same_order_whichever_way_the_body_is_read(
        session_store: Path, body: Any, status: int, code: str | None) -> None:
    async with probed_app(session_store) as (client, probe, _):
        r = await client.post("/v1/models/iris/predict", json=body)
        assert r.status_code == status
        assert code is None or r.json()["error"]["code"] == code
        assert probe.calls == 0
