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


def _pipelined(port: int, requests: list[bytes], rounds: int) -> list[int]:
    """Send ``requests`` ``rounds`` times, pipelined on one connection, a round at a time;
    the status of every response."""
    import socket

    import httptools

    statuses: list[int] = []

    class _Responses:
        def on_message_complete(self) -> None:
            statuses.append(parser.get_status_code())

    parser = httptools.HttpResponseParser(_Responses())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for n in range(1, rounds + 1):
            sock.sendall(b"".join(requests))
            while len(statuses) < n * len(requests):
                data = sock.recv(1 << 16)
                assert data, "the gateway closed the connection"
                parser.feed_data(data)
    return statuses


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
    must mean none at all (over 10,002 requests), on exactly the gateway's own line per
    request."""
    from bench.procs import gateway_process

    env = {"GATEWAY_MODEL_ROOT": str(session_store), "GATEWAY_ACCESS_LOG": access_log,
           "GATEWAY_MODEL_POLL_S": "0"}
    v2 = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 4],
                                   "data": [5.0, 3.0, 1.4, 0.2]}]})
    round_ = [b"GET /predict?sepal_length=5&sepal_width=3&petal_length=1.4&petal_width=0.2 "
              b"HTTP/1.1\r\nhost: gw\r\n\r\n",
              *(b"GET %s HTTP/1.1\r\nhost: gw\r\n\r\n" % p
                for p in (b"/readyz", b"/metrics", b"/v1/models", b"/healthz")),
              b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: gw\r\ncontent-type: "
              b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(v2), v2)]
    rounds = 1667 if access_log == "off" else 100  # 6 requests a round
    with gateway_process(env) as gw:
        logged_before = len(gw.log)
        assert gw.port is not None
        statuses = _pipelined(gw.port, round_, rounds)
        gw.terminate()
    assert statuses == [200] * (6 * rounds)
    lines = gw.log[logged_before:]
    access = [ln for ln in lines if "gateway.access" in ln or "uvicorn.access" in ln]
    assert not [ln for ln in lines if "uvicorn.access" in ln]
    assert len(access) == (6 * rounds if access_log == "on" else 0), access[:3]
