"""Door requests answered without an ASGI task (``gateway.server``), against a real gateway
process and raw connections: pipelining, keep-alive, HTTP/1.0, ``Expect: 100-continue``,
bodies in pieces or chunked, and answers that have to wait for the model."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tests.hardening.procs import gateway_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROW = "sepal_length=5.1&sepal_width=3.5&petal_length=1.4&petal_width=0.2"
V1 = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'


def _get(query: str = ROW, version: bytes = b"1.1") -> bytes:
    return b"GET /predict?" + query.encode() + b" HTTP/" + version + b"\r\nHost: gw\r\n\r\n"


def _post(body: bytes = V1, extra: bytes = b"") -> bytes:
    return (b"POST /v1/models/iris/predict HTTP/1.1\r\nHost: gw\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n" + extra + b"\r\n" + body)


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One Content-Length framed response: status line, headers, body."""
    async with asyncio.timeout(30):
        head = await reader.readuntil(b"\r\n\r\n")
        status, *lines = head[:-4].split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in
                   (line.split(b":", 1) for line in lines)}
        return status, headers, await reader.readexactly(int(headers[b"content-length"]))


def test_door_requests_keep_http_semantics(session_store: Path) -> None:
    env = {"GATEWAY_MODEL_ROOT": str(session_store)}

    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for request in (_get(), _post()):  # misses: the model runs in a task
            writer.write(request)
            assert (await _response(reader))[0] == b"HTTP/1.1 200 OK"
        # Three pipelined requests in one write, answered at once from L1.
        writer.write(_get() + _post() + _get())
        answers = [await _response(reader) for _ in range(3)]
        assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 3
        assert json.loads(answers[0][2]) == {"prediction": "setosa"}
        assert json.loads(answers[1][2])["predictions"] == ["setosa"]
        for _status, headers, _body in answers:
            assert b"date" in headers and b"x-request-id" in headers
            assert b"connection" not in headers
        # The connection stays usable past the keep-alive timeout while it is busy.
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            writer.write(_get())
            status, headers, body = await _response(reader)
            assert status == b"HTTP/1.1 200 OK" and headers[b"x-cache"] == b"l1"
        # A body in two pieces, then one that must be chunked: both answered.
        request = _post()
        writer.write(request[:-10])
        await writer.drain()
        writer.write(request[-10:])
        assert json.loads((await _response(reader))[2])["predictions"] == ["setosa"]
        writer.write(b"POST /v1/models/iris/predict HTTP/1.1\r\nHost: gw\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     + f"{len(V1):x}\r\n".encode() + V1 + b"\r\n0\r\n\r\n")
        assert json.loads((await _response(reader))[2])["predictions"] == ["setosa"]
        # Expect: 100-continue is honoured before the body is sent.
        head, body = _post(extra=b"Expect: 100-continue\r\n").split(b"\r\n\r\n", 1)
        writer.write(head + b"\r\n\r\n")
        async with asyncio.timeout(30):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        assert json.loads((await _response(reader))[2])["predictions"] == ["setosa"]
        writer.close()
        await writer.wait_closed()

        # HTTP/1.0: answered, then closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_get(version=b"1.0"))
        status, headers, body = await _response(reader)
        assert status == b"HTTP/1.1 200 OK" and headers[b"connection"] == b"close"
        async with asyncio.timeout(30):
            assert await reader.read() == b""
        writer.close()

    with gateway_process(env, args=("--timeout-keep-alive", "1")) as gw:
        asyncio.run(scenario(gw.port))
        assert not any("Exception in ASGI application" in line for line in gw.log), gw.log


def test_a_door_body_over_the_limit_is_413(session_store: Path) -> None:
    env = {"GATEWAY_MODEL_ROOT": str(session_store), "GATEWAY_MAX_BODY_BYTES": "100"}

    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        rows = b'{"instances": [' + b",".join([b"[5.1, 3.5, 1.4, 0.2]"] * 8) + b"]}"
        writer.write(_post(rows))
        status, _headers, body = await _response(reader)
        assert status.startswith(b"HTTP/1.1 413"), (status, body)
        writer.write(_post())  # within the limit, on the same connection
        assert json.loads((await _response(reader))[2])["predictions"] == ["setosa"]
        writer.close()

    with gateway_process(env) as gw:
        asyncio.run(scenario(gw.port))
