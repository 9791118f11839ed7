"""The server's configuration from settings, and its protocol driven in-process with raw bytes
(its behaviour is tested against real processes in tests/hardening)."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import orjson
import pytest
import uvicorn

from gateway import Settings, create_app
from gateway.server import (
    GatewayConfig,
    GatewayHttpProtocol,
    GatewayServerState,
    default_connection_limit,
    gateway_config,
)
from tests.hardening.procs import metric

_ROW = b"sepal_length=5.1&sepal_width=3.5&petal_length=1.4&petal_width=0.2"


@pytest.mark.parametrize(("soft", "limit"), [
    (1024, 896), (20_000, 17_500), (256, 128), (100, 1), (resource.RLIM_INFINITY, 65_536),
])
def test_connection_limit_leaves_a_reserve_of_open_files(
    monkeypatch: pytest.MonkeyPatch, soft: int, limit: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, resource.RLIM_INFINITY))
    assert default_connection_limit() == limit


def test_config_takes_bounds_from_settings_and_overrides_from_the_caller() -> None:
    settings = Settings(header_timeout_s=2, body_timeout_s=3, shutdown_grace_s=4,
                        limit_concurrency=50)
    quiet = {"log_config": None}  # uvicorn.Config would otherwise configure logging globally
    cfg = gateway_config(settings, host="127.0.0.1", port=9, workers=2, **quiet)
    assert isinstance(cfg, GatewayConfig)
    assert (cfg.header_timeout_s, cfg.body_timeout_s, cfg.shutdown_grace_s) == (2, 3, 4)
    assert cfg.limit_concurrency == 50 and cfg.workers == 2 and cfg.port == 9
    assert cfg.http is GatewayHttpProtocol and cfg.loop == "uvloop" and not cfg.access_log
    assert gateway_config(Settings(), **quiet).limit_concurrency == default_connection_limit()
    assert gateway_config(Settings(), limit_concurrency=7, **quiet).limit_concurrency == 7


def test_a_response_leaves_in_one_write() -> None:
    """Head and body of a response are joined into one write of the real transport."""
    import asyncio

    from gateway.server import _OneWrite

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

        def get_extra_info(self, name: str, default: object = None) -> str:
            return name

    loop = asyncio.new_event_loop()
    try:
        real = Recorder()
        out = _OneWrite(real, loop)  # type: ignore[arg-type]
        out.write(b"HTTP/1.1 200 OK\r\n\r\n")
        out.write(b"body")
        assert real.writes == []
        out.flush()  # the response is complete
        assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        out.write(b"late")
        loop.call_soon(loop.stop)
        loop.run_forever()  # a write not followed by a flush still leaves on the next step
        assert real.writes[-1] == b"late"
        out.write(b"last")
        out.close()  # closing sends what is pending first
        assert real.writes[-1] == b"last" and real.closed
        assert out.get_extra_info("peername") == "peername"
    finally:
        loop.close()


@pytest.mark.anyio
async def test_a_send_lets_the_gil_go_and_what_is_left_keeps_its_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While a model's thread is alive, a write with nothing buffered before it goes out by
    ``os.write`` (the GIL let go); what the socket does not take goes through the transport,
    and every later write follows it there: the bytes arrive whole, in order. With no model
    thread, the transport writes."""
    import os
    import socket

    from gateway.core.runner import ModelThreads
    from gateway.server import _OneWrite

    direct: list[int] = []
    write = os.write

    def counted(fd: int, data: bytes) -> int:
        sent = write(fd, data)
        direct.append(sent)
        return sent

    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    try:
        out = _OneWrite(transport, loop)  # type: ignore[arg-type]
        big = bytes(range(256)) * 16384  # 4 MiB: more than the socket takes at once
        monkeypatch.setattr("gateway.server.os.write", counted)
        monkeypatch.setattr(ModelThreads, "alive", 0)
        out.write_now(b"idle:")
        assert direct == []
        monkeypatch.setattr(ModelThreads, "alive", 1)
        out.write_now(b"head:")
        out.write_now(big)
        out.write_now(b":tail")
        expected = b"idle:head:" + big + b":tail"
        got = bytearray()
        while len(got) < len(expected):
            got += await loop.sock_recv(theirs, 1 << 20)
        assert bytes(got) == expected
        assert direct[0] == len(b"head:") and 0 < direct[1] < len(big)
        assert len(direct) == 2  # once something was buffered, the transport wrote the rest
    finally:
        transport.close()
        theirs.close()


class _Transport:
    """A connection's transport as the protocol sees it: records what is written."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False
        self.wrote = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.data += data
        self.wrote.set()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(
            name, default)

    async def response(self) -> tuple[bytes, bytes]:
        """The next whole response (head, body), Content-Length framed; consumed."""
        async with asyncio.timeout(30):
            while b"\r\n\r\n" not in self.data or len(self._rest()) < self._length():
                self.wrote.clear()
                await self.wrote.wait()
        head, _, rest = self.data.partition(b"\r\n\r\n")
        body, self.data = rest[:self._length()], rest[self._length():]
        return head, body

    def _rest(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]

    def _length(self) -> int:
        head = self.data.partition(b"\r\n\r\n")[0].lower()
        return int(head.split(b"content-length: ")[1].split(b"\r\n")[0])


@pytest.mark.anyio
async def test_the_fast_lane_answers_raw_requests_and_counts_them(session_store: Path) -> None:
    """``GatewayHttpProtocol`` fed raw HTTP on a real event loop: a door request that needs the
    model (in a thread here) continues in a task; the same request again is answered from L1
    at the end of the loop step, no task; ``gateway_fast_lane_requests_total`` counts each by
    how, and a request with a chunked body is counted as bypassing the lane."""
    app = create_app(Settings(model_root=session_store, execution="thread"))
    async with app.router.lifespan_context(app) as state:
        assert state is not None
        metrics = state["gateway"].metrics
        config = uvicorn.Config(app, http=GatewayHttpProtocol, log_config=None)
        config.load()
        protocol = GatewayHttpProtocol(config, GatewayServerState(), dict(state),
                                       _loop=asyncio.get_running_loop())
        transport = _Transport()
        protocol.connection_made(transport)  # type: ignore[arg-type]

        def lane(how: str) -> float:
            return metric(metrics.render().decode(), "gateway_fast_lane_requests_total",
                          how=how)

        request = b"GET /predict?" + _ROW + b" HTTP/1.1\r\nHost: gw\r\n\r\n"
        protocol.data_received(request)
        head, body = await transport.response()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-cache: miss" in head
        assert orjson.loads(body) == {"prediction": "setosa"}
        assert (lane("continued"), lane("answered")) == (1, 0)
        if protocol.tasks:
            await asyncio.wait(set(protocol.tasks))  # the task that answered ends

        protocol.data_received(request)
        assert not protocol.tasks and transport.data == b""  # no task; written at the step's end
        head, body = await transport.response()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-cache: l1" in head
        assert b"\r\ncontent-length: " in head and b"connection" not in head
        assert orjson.loads(body) == {"prediction": "setosa"}
        assert (lane("continued"), lane("answered")) == (1, 1)

        v1 = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
        protocol.data_received(b"POST /v1/models/iris/predict HTTP/1.1\r\nHost: gw\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n"
                               + f"{len(v1):x}\r\n".encode() + v1 + b"\r\n0\r\n\r\n")
        head, body = await transport.response()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert orjson.loads(body)["predictions"] == ["setosa"]
        text = metrics.render().decode()
        assert metric(text, "gateway_fast_lane_bypassed_total", reason="body") == 1
        assert metric(text, "gateway_fast_lane_requests_total") == 2
        protocol.connection_lost(None)
