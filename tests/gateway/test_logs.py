"""Request ids, the access log and JSON log lines."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import orjson
import pytest

from gateway import logs
from tests.support import POISON, probed_app

pytestmark = pytest.mark.anyio

Q = "/predict?sepal_length=5.1&sepal_width=3.5&petal_length=1.4&petal_width=0.2"


@pytest.mark.parametrize(("given", "kept"), [
    (b"abc-123", True), (b"a" * 128, True), (b"a" * 129, False), (b"bad id", False),
    (b"\xb2", False), (b"", False), (None, False),
])
def test_request_id_is_taken_only_when_usable(given: bytes | None, kept: bool) -> None:
    rid = logs.request_id_from(given)
    assert (rid == (given or b"").decode("latin-1")) is kept
    assert logs.request_id_from(None) != logs.request_id_from(None)


async def test_request_id_is_echoed_by_doors_and_routes(session_store: Path) -> None:
    async with probed_app(session_store) as (client, _, _):
        for path in (Q, "/readyz", "/v1/models"):
            r = await client.get(path, headers={"x-request-id": "req-42"})
            assert r.headers["x-request-id"] == "req-42"
            made = (await client.get(path)).headers["x-request-id"]
            assert made and made != "req-42"


async def test_access_log_and_model_warnings_carry_the_request_id(
        session_store: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(logs.RequestIdFilter())
    caplog.set_level(logging.INFO)
    async with probed_app(session_store, access_log="on") as (client, _, _):
        ok = await client.get(Q, headers={"x-request-id": "r-ok"})
        bad = await client.post("/v1/models/iris/predict",
                                json={"instances": [[POISON, 1, 1, 1]]},
                                headers={"x-request-id": "r-bad"})
    assert ok.status_code == 200 and bad.status_code == 500
    access = [r for r in caplog.records if r.name == "gateway.access"]
    assert [(r.request_id, r.status, r.path) for r in access] == [  # type: ignore[attr-defined]
        ("r-ok", 200, "/predict"), ("r-bad", 500, "/v1/models/iris/predict")]
    assert (access[0].cache, access[0].model, access[0].version) == (  # type: ignore[attr-defined]
        "miss", "iris", "1")
    warned = [r for r in caplog.records if r.name == "gateway.runner"]
    assert warned and all(r.request_id == "r-bad" for r in warned)  # type: ignore[attr-defined]


async def test_access_log_is_off_by_default(session_store: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with probed_app(session_store) as (client, _, _):
        await client.get(Q)
    assert not [r for r in caplog.records if r.name == "gateway.access"]


def test_json_lines_hold_the_request_fields() -> None:
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1,
                               "%s %s", ("GET", "/predict"), None)
    record.request_id = "r1"
    record.status = 200
    record.cache = "l1"
    line = orjson.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "GET /predict" and line["level"] == "INFO"
    assert (line["request_id"], line["status"], line["cache"]) == ("r1", 200, "l1")
    assert line["logger"] == "gateway.access" and line["time"].endswith("Z")
    assert line["pid"] == os.getpid()  # which worker (or the supervisor) wrote it
    assert "model" not in line


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("access_log", ["off", "on"])
def test_a_served_gateway_logs_one_access_line_per_request_only_when_asked(
        session_store: Path, access_log: str) -> None:
    """uvicorn logs access lines whenever its logger has a handler somewhere up the tree: off
    must mean none at all, on exactly the gateway's own line per request."""
    import httpx

    from bench.procs import gateway_process

    env = {"GATEWAY_MODEL_ROOT": str(session_store), "GATEWAY_ACCESS_LOG": access_log,
           "GATEWAY_MODEL_POLL_S": "0"}
    paths = ["/predict?sepal_length=5&sepal_width=3&petal_length=1.4&petal_width=0.2",
             "/readyz", "/metrics", "/v1/models", "/healthz"]
    with gateway_process(env) as gw, httpx.Client(base_url=gw.base) as client:
        logged_before = len(gw.log)
        for _ in range(100):
            for path in paths:
                assert client.get(path).status_code == 200
            r = client.post("/v2/models/iris/infer", json={"inputs": [
                {"name": "input", "datatype": "FP64", "shape": [1, 4],
                 "data": [5.0, 3.0, 1.4, 0.2]}]})
            assert r.status_code == 200
        gw.terminate()
    lines = gw.log[logged_before:]
    access = [ln for ln in lines if "gateway.access" in ln or "uvicorn.access" in ln]
    assert not [ln for ln in lines if "uvicorn.access" in ln]
    assert len(access) == (600 if access_log == "on" else 0), access[:3]
