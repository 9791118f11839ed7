"""Door requests answered without an ASGI task (``gateway.server``), against a real gateway
process and raw connections: pipelining, keep-alive, HTTP/1.0, ``Expect: 100-continue``,
bodies in pieces or chunked, and answers that have to wait for the model; and that the fast
lane is taken, as ``gateway_fast_lane_requests_total`` counts it."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import GatewayProcess, gateway_process
from tests.hardening.procs import metric

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


# -- the fast lane is taken: gateway_fast_lane_requests_total ---------------------------------

LANE = "gateway_fast_lane_requests_total"
BYPASSED = "gateway_fast_lane_bypassed_total"
_fresh = itertools.count(1)


def _new_row() -> str:
    """A row no test of this module has asked for (each is a miss the first time)."""
    return (f"sepal_length={4 + next(_fresh) / 1000:.3f}&sepal_width=3.5&petal_length=1.4"
            f"&petal_width=0.2")


@pytest.fixture(scope="module")
def lane_gateway(compiled_store: Path) -> Iterator[GatewayProcess]:
    """A gateway over the compiled iris model, measured tiny: its misses run inline once
    warmed up (a threshold far above its microseconds, so no machine load flips it)."""
    env = {"GATEWAY_MODEL_ROOT": str(compiled_store), "GATEWAY_INLINE_MAX_US": "10000"}
    with gateway_process(env) as gw:
        yield gw
        assert not any("Exception in ASGI application" in line for line in gw.log), gw.log


class _Counts:
    """Counters read from ``/metrics`` now, and what they have grown by since."""

    def __init__(self, gw: GatewayProcess) -> None:
        self._gw = gw
        self._before = gw.metrics()

    def grew(self, name: str, **labels: str) -> float:
        return metric(self._gw.metrics(), name, **labels) - metric(self._before, name, **labels)


async def _ask(port: int, requests: list[bytes]) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Each request on one connection, waiting for its answer before the next."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    for request in requests:
        writer.write(request)
        answers.append(await _response(reader))
    writer.close()
    await writer.wait_closed()
    return answers


def test_l1_hits_take_the_fast_lane(lane_gateway: GatewayProcess) -> None:
    row = _new_row()
    body = b'{"instances": [[' + row.split("&")[0].split("=")[1].encode() + b', 3.5, 1.4, 0.2]]}'
    asyncio.run(_ask(lane_gateway.port, [_get(row), _post(body)]))  # misses: now in L1
    counts = _Counts(lane_gateway)
    answers = asyncio.run(_ask(lane_gateway.port, [_get(row), _post(body)] * 5))
    assert all(status == b"HTTP/1.1 200 OK" for status, _, _ in answers)
    assert all(headers[b"x-cache"] == b"l1" for _, headers, _ in answers[::2])  # the GETs
    assert counts.grew(LANE, how="answered") == 10
    assert counts.grew(LANE) == 10 and counts.grew(BYPASSED) == 0
    assert counts.grew("gateway_cache_lookups_total", tier="l1", result="hit") == 10


def test_new_rows_computed_inline_take_the_fast_lane(lane_gateway: GatewayProcess) -> None:
    inline = {"name": "gateway_model_exec_total", "model": "iris", "place": "inline"}
    counts = _Counts(lane_gateway)
    sent = 0
    while not counts.grew(**inline):  # warm-up: measured in the thread, then inline
        assert sent < 200, "the compiled model never ran inline"
        asyncio.run(_ask(lane_gateway.port, [_get(_new_row()) for _ in range(4)]))
        sent += 4
    assert counts.grew(LANE) == sent  # answered or continued, each one through the lane
    counts = _Counts(lane_gateway)
    answers = asyncio.run(_ask(lane_gateway.port, [_get(_new_row()) for _ in range(20)]))
    assert all(headers[b"x-cache"] == b"miss" for _, headers, _ in answers)
    assert counts.grew(**inline) == 20  # one inline call each
    assert counts.grew(LANE, how="answered") == 20 and counts.grew(LANE) == 20


def test_pipelined_requests_take_the_fast_lane(lane_gateway: GatewayProcess) -> None:
    row = _new_row()
    asyncio.run(_ask(lane_gateway.port, [_get(row)]))  # now in L1

    async def pipelined(port: int, n: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_get(row) * n)
        answers = [await _response(reader) for _ in range(n)]
        writer.close()
        await writer.wait_closed()
        return answers

    counts = _Counts(lane_gateway)
    answers = asyncio.run(pipelined(lane_gateway.port, 5))
    assert [json.loads(body) for _, _, body in answers] == [{"prediction": "setosa"}] * 5
    assert counts.grew(BYPASSED, reason="pipelined") == 0
    assert counts.grew(LANE, how="answered") == 5


def test_pipelined_posts_and_misses_take_the_fast_lane(lane_gateway: GatewayProcess) -> None:
    """Requests with bodies, and new rows (inline model calls), written in one go."""
    rows = [_new_row() for _ in range(6)]
    requests = [_get(r) for r in rows[:3]] + [
        _post(b'{"instances": [[' + r.split("&")[0].split("=")[1].encode()
              + b', 2.5, 4.4, 1.2]]}') for r in rows[3:]]

    async def pipelined(port: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(requests))
        answers = [await _response(reader) for _ in requests]
        writer.close()
        await writer.wait_closed()
        return answers

    counts = _Counts(lane_gateway)
    answers = asyncio.run(pipelined(lane_gateway.port))
    assert [a[0].split(b" ")[1] for a in answers] == [b"200"] * 6
    assert counts.grew(BYPASSED) == 0
    assert counts.grew(LANE) == 6


def test_bodies_the_lane_cannot_hold_bypass_it(lane_gateway: GatewayProcess) -> None:
    chunked = (b"POST /v1/models/iris/predict HTTP/1.1\r\nHost: gw\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"
               + f"{len(V1):x}\r\n".encode() + V1 + b"\r\n0\r\n\r\n")
    counts = _Counts(lane_gateway)
    answers = asyncio.run(_ask(lane_gateway.port, [chunked, chunked]))
    assert [json.loads(body)["predictions"] for _, _, body in answers] == [["setosa"]] * 2
    assert counts.grew(BYPASSED, reason="body") == 2 and counts.grew(LANE) == 0
