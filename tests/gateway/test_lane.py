"""The fast lane in-process: which door requests it answers at once, continues in a task, or
leaves to an ASGI task, through the in-process client (the gateway's own protocol)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.lane import FAST_BODY_BYTES, http_response
from gateway.protocols.http import Reply
from tests.support import probed_app, wait_for, wait_thread_event

pytestmark = pytest.mark.anyio

Q = "/predict?sepal_length=5.1&sepal_width=3.5&petal_length=1.4&petal_width=0.2"


def lane(gw: object, how: str) -> float:
    metrics = gw.metrics  # type: ignore[attr-defined]
    metrics.tally.flush()
    return float(metrics.fast_lane.labels(how)._value.get())


def bypassed(gw: object, reason: str) -> float:
    metrics = gw.metrics  # type: ignore[attr-defined]
    metrics.tally.flush()
    return float(metrics.fast_lane_bypassed.labels(reason)._value.get())


async def test_hits_and_inline_calls_are_answered_in_the_lane(session_store: Path) -> None:
    async with probed_app(session_store, execution="inline") as (client, probe, gw):
        assert (await client.get(Q)).headers["x-cache"] == "miss"  # an inline call
        assert (await client.get(Q)).headers["x-cache"] == "l1"
        r = await client.post("/v2/models/iris/infer", json={"inputs": [
            {"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]})
        assert r.status_code == 200
        assert lane(gw, "answered") == 3 and lane(gw, "continued") == 0
        assert probe.calls == 1


async def test_a_miss_that_waits_continues_in_a_task(session_store: Path) -> None:
    async with probed_app(session_store, execution="thread") as (client, probe, gw):
        probe.gate.clear()
        asked = asyncio.create_task(client.get(Q))
        await wait_thread_event(probe.entered)
        probe.gate.set()
        assert (await asked).json() == {"prediction": "setosa"}
        assert lane(gw, "continued") == 1 and lane(gw, "answered") == 0


async def test_misses_of_one_step_wait_as_one_group_and_shutdown_answers_them_503(
        session_store: Path) -> None:
    async with probed_app(session_store, execution="thread") as (client, probe, gw):
        probe.gate.clear()
        asked = [asyncio.create_task(client.get(Q)) for _ in range(3)]
        await wait_thread_event(probe.entered)
        await wait_for(lambda: gw.pipeline.waiting() == 3)
        tasks = client._transport._state.tasks  # type: ignore[attr-defined]
        assert len(tasks) == 1  # the step's group: one task for the three requests
        for task in tasks:  # what the shutdown does to what is left after its grace period
            task.cancel()
        responses = await asyncio.gather(*asked)
        probe.gate.set()
        for r in responses:
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert r.headers["connection"] == "close"
        assert lane(gw, "continued") == 3 and probe.calls == 1


async def test_a_body_too_big_to_hold_bypasses_the_lane(session_store: Path) -> None:
    row = '{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}'
    body = ('{"instances": [' + ", ".join([row] * (FAST_BODY_BYTES // len(row) + 1)) + "]}")
    async with probed_app(session_store) as (client, _probe, gw):
        r = await client.post("/v1/models/iris/predict", content=body,
                              headers={"content-type": "application/json"})
        assert r.status_code == 200 and len(r.json()["predictions"]) > 1
        assert bypassed(gw, "body") == 1 and lane(gw, "answered") == 0


async def test_a_body_of_the_largest_size_held_is_answered_in_the_lane(
        session_store: Path) -> None:
    row = '{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}'
    body = '{"instances": [' + ", ".join([row] * (FAST_BODY_BYTES // (len(row) + 2) - 1)) + "]}"
    body += " " * (FAST_BODY_BYTES - len(body))
    assert len(body) == FAST_BODY_BYTES
    async with probed_app(session_store, execution="inline") as (client, _probe, gw):
        r = await client.post("/v1/models/iris/predict", content=body,
                              headers={"content-type": "application/json"})
        assert r.status_code == 200 and len(r.json()["predictions"]) > 1
        assert bypassed(gw, "body") == 0 and lane(gw, "answered") == 1


def test_the_lane_writes_one_http_response() -> None:
    reply = Reply(503, b'{"error": "x"}', [(b"retry-after", b"1")])
    data = http_response(reply, [(b"server", b"uvicorn")], keep_alive=False)
    assert data == (b"HTTP/1.1 503 Service Unavailable\r\nserver: uvicorn\r\n"
                    b"content-type: application/json\r\ncontent-length: 14\r\n"
                    b"retry-after: 1\r\nconnection: close\r\n\r\n" b'{"error": "x"}')
