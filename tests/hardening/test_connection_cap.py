"""The connection cap makes room by closing an idle connection, never one whose pipelined
request is being answered."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from bench.procs import gateway_process
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES
from tests.gateway.remote_support import NOTIFY_ENV, SLEEP_ENV, Sleepy

pytestmark = pytest.mark.e2e

CAP = 2


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    async with asyncio.timeout(30):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:"))
        return int(head.split(b" ")[1]), await reader.readexactly(length)


def test_room_is_made_by_closing_an_idle_connection_not_a_pipelined_answer(
        tmp_path: Path, iris_estimator: Any) -> None:
    store = tmp_path / "models"
    ModelStore(store).register(Sleepy(iris_estimator), "iris", features=IRIS_FEATURES,
                               backend="sklearn")
    sock = str(tmp_path / "calls.sock")
    env = {"GATEWAY_MODEL_ROOT": str(store), "GATEWAY_MODEL_POLL_S": "0",
           "GATEWAY_LIMIT_CONCURRENCY": str(CAP), SLEEP_ENV: "0.5", NOTIFY_ENV: sock}
    row = [6.1, 2.8, 4.7, 1.2]
    body = orjson.dumps({"instances": [row]})
    pipelined = (b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
                 b"POST /v1/models/iris/predict HTTP/1.1\r\nHost: gw\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)

    async def run(port: int) -> tuple[int, bytes]:
        called = asyncio.Event()

        async def on_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.close()
            called.set()

        async with await asyncio.start_unix_server(on_call, sock):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(pipelined)
            assert (await _response(reader))[0] == 200  # /healthz; the prediction is running
            await asyncio.wait_for(called.wait(), 30)
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
            try:
                return await _response(reader)
            finally:
                for _, w in [*idle, (reader, writer)]:
                    w.close()

    with gateway_process(env) as gw:
        status, answer = asyncio.run(run(gw.port))
    assert status == 200
    assert orjson.loads(answer)["predictions"] == iris_estimator.predict(np.array([row])).tolist()
