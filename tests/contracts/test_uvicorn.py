"""What ``gateway/server.py``, ``gateway/lane.py`` and ``gateway/supervisor.py`` rely on inside
uvicorn: the httptools protocol and its request cycle (the slow-client limits and the doors' fast
lane), the server (signals, shutdown). ``FENCE`` is the table (see ``fence.py``); the tests below
it run uvicorn's code for the behaviours a digest alone does not show."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http import flow_control
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from tests.contracts.fence import Fence, check, pin, report

HT = "uvicorn.protocols.http.httptools_impl"
SV = "uvicorn.server"
TY = "uvicorn._types"

FENCE = Fence("uvicorn", "0.55.0", "tests/contracts/test_uvicorn.py", (
    # The protocol: every method GatewayHttpProtocol overrides, and what its fast lane relies on.
    pin(HT, "HttpToolsProtocol.__init__", "4f0899941034",  # limit_concurrency, connections,
        "server:GatewayHttpProtocol.__init__",  # app, loop, tasks (the lane's group tasks)
        "server:GatewayHttpProtocol._lane_of", "lane:FastLane.__init__"),
    pin(HT, "HttpToolsProtocol.connection_made", "6efb565ff3d3",
        "server:GatewayHttpProtocol.connection_made", "server:_OneWrite"),
    pin(HT, "HttpToolsProtocol.connection_lost", "c91a4c9bf2e2",
        "server:GatewayHttpProtocol.connection_lost"),
    pin(HT, "HttpToolsProtocol.data_received", "010a7ae59a5d",
        "server:GatewayHttpProtocol.data_received"),
    pin(HT, "HttpToolsProtocol.on_message_begin", "96d377fdc7c2",
        "server:GatewayHttpProtocol.on_message_begin"),
    pin(HT, "HttpToolsProtocol.on_headers_complete", "1ea8589acfad",  # starts the request
        "server:GatewayHttpProtocol.on_headers_complete",
        "server:GatewayHttpProtocol._start_asgi_task"),
    pin(HT, "HttpToolsProtocol._start_asgi_task", "8d0189e65525",
        "server:GatewayHttpProtocol._start_asgi_task", "server:GatewayHttpProtocol.start_task",
        "lane:FastLane.release", "lane:FastLane._continue_alone"),
    pin(HT, "HttpToolsProtocol.on_body", "dba9c32aeba3",  # the body gathers in cycle.body
        "server:GatewayHttpProtocol.on_message_complete", "lane:FastLane._queue"),
    pin(HT, "HttpToolsProtocol.on_message_complete", "1fbad42dc31f",
        "server:GatewayHttpProtocol.on_message_complete"),
    pin(HT, "HttpToolsProtocol.on_response_complete", "64e254f28e38",  # starts the pipelined
        "server:GatewayHttpProtocol.on_response_complete", "lane:FastLane._write"),
    pin(HT, "HttpToolsProtocol.shutdown", "d7351fa33f00",
        "server:GatewayHttpProtocol.shutdown", "server:GatewayServer.shutdown"),
    # The request cycle: the fast lane writes its response as send would, and marks it done.
    pin(HT, "RequestResponseCycle.__init__", "4d2f220910c3",
        "lane:FastLane._write", "server:GatewayHttpProtocol._close", "lane:_small_body"),
    pin(HT, "RequestResponseCycle.send", "abdd8601b326",
        "lane:http_response", "lane:FastLane._write", "server:_OneWrite"),
    pin(HT, "RequestResponseCycle.run_asgi", "0f33f2449a44",  # its 500 and log line
        "server:GatewayHttpProtocol._guarded", "lane:FastLane._answer_step"),
    pin(HT, "STATUS_LINE", None, "lane:http_response"),
    pin("uvicorn.protocols.http.flow_control", "HIGH_WATER_LIMIT", None,
        "lane:FAST_BODY_BYTES"),
    # The server: signals, shutdown (replaced), protocol construction.
    pin(SV, "ServerState.__init__", "8daf3a9b4e4e",
        "server:GatewayServerState.__init__", "server:GatewayHttpProtocol.default_headers"),
    pin(SV, "Server.__init__", "c150b55284f7", "server:GatewayServer.__init__"),
    pin(SV, "Server.startup", "2aa1d70a244b",  # protocol keywords, self.servers, started
        "server:GatewayHttpProtocol.__init__", "server:GatewayServer.shutdown"),
    pin(SV, "Server._serve", "4575b7a50adf",  # shutdown(sockets=) once started; lifespan
        "server:GatewayServer.shutdown", "server:run"),
    pin(SV, "Server.shutdown", "5d01b8b1f116", "server:GatewayServer.shutdown"),
    pin(SV, "Server._wait_tasks_to_complete", "17209be1e991",
        "server:GatewayServer._wait_for_requests", "server:GatewayServer._wait_for_connections",
        "lane:FastLane._finish"),
    pin(SV, "Server.capture_signals", "e1bbcd4770d1", "server:GatewayServer.capture_signals"),
    pin(SV, "Server.handle_exit", "553276efa26e",  # appends to _captured_signals
        "server:GatewayServer.capture_signals"),
    pin("uvicorn.lifespan.on", "LifespanOn.__init__", "6acdad3ec7ab",  # state: the app state
        "server:GatewayServer.shutdown", "lane:FastLane.of"),
    # Names imported from uvicorn's internal modules.
    pin(TY, "ASGI3Application", None, "server:GatewayHttpProtocol._start_asgi_task"),
    pin(TY, "ASGIReceiveCallable", None, "server:GatewayHttpProtocol._guarded"),
    pin(TY, "ASGISendCallable", None, "lane:FastLane._continue_alone"),
    pin(TY, "Scope", None, "lane:FastLane._continue_alone",
        "server:GatewayHttpProtocol._unavailable"),
    pin("uvicorn.config", "STARTUP_FAILURE", None,
        "server:run", "supervisor:_work",
        "supervisor:_Supervisor._ended"),
))


def test_uvicorn_pins_hold() -> None:
    problems = check(FENCE)
    assert not problems, report(problems)


def test_a_release_without_start_asgi_task_names_the_fast_lane(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A simulated release that renames ``_start_asgi_task``: the fence names our override,
    which uvicorn would no longer call (the fast lane silently unused)."""
    monkeypatch.delattr(HttpToolsProtocol, "_start_asgi_task")
    problems = check(FENCE)
    assert len(problems) == 1, problems
    assert "uvicorn HttpToolsProtocol._start_asgi_task is gone" in problems[0]
    assert "GatewayHttpProtocol._start_asgi_task" in problems[0]
    assert "gateway/server.py" in problems[0] and "0.55.0" in problems[0]


def test_a_release_that_changes_start_asgi_task_names_the_fast_lane(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def _start_asgi_task(self: Any, cycle: Any, app: Any) -> None:  # uvicorn's, reworked
        self.loop.create_task(cycle.run_asgi(app))

    monkeypatch.setattr(HttpToolsProtocol, "_start_asgi_task", _start_asgi_task)
    (problem,) = check(FENCE)
    assert problem.startswith("uvicorn HttpToolsProtocol._start_asgi_task changed")
    assert "re-check GatewayHttpProtocol._start_asgi_task" in problem
    assert "then set its digest to" in problem


# -- behaviours, run in-process ---------------------------------------------------------------

class _Transport:
    """Enough of an asyncio transport for uvicorn's protocol: records writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(
            name, default)


async def _app(scope: Any, receive: Any, send: Any) -> None:  # never run here
    raise AssertionError("not to be run")


def _config(**options: Any) -> uvicorn.Config:
    config = uvicorn.Config(_app, log_config=None, **options)
    config.load()
    return config


class _Recording(HttpToolsProtocol):
    """uvicorn's protocol, recording each request start instead of running the app."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[tuple[RequestResponseCycle, Any]] = []

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self.started.append((cycle, app))


def _protocol(loop: asyncio.AbstractEventLoop, **options: Any) -> _Recording:
    protocol = _Recording(config=_config(**options), server_state=ServerState(),
                          app_state={}, _loop=loop)
    protocol.connection_made(_Transport())  # type: ignore[arg-type]
    return protocol


def test_a_request_starts_inside_on_headers_complete_and_a_pipelined_one_after_the_response(
) -> None:
    """What the fast lane is built on (re-check ``GatewayHttpProtocol._start_asgi_task``,
    ``on_message_complete`` and ``deliver`` in gateway/server.py if this fails): the first
    request starts from ``on_headers_complete`` with the protocol's own app before its body is
    parsed; its body gathers in ``cycle.body``; ``more_body`` turns False when it is complete; a
    pipelined request waits in ``pipeline`` and starts from ``cycle.on_response()``."""
    loop = asyncio.new_event_loop()
    try:
        protocol = _protocol(loop)
        body = b'{"x": 1}'
        post = (b"POST /v1/models/m/predict HTTP/1.1\r\nHost: gw\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n")
        protocol.data_received(post)
        ((cycle, app),) = protocol.started
        assert app is protocol.app and cycle is protocol.cycle
        assert cycle.body == b"" and cycle.more_body
        assert cycle.scope["path"] == "/v1/models/m/predict" and cycle.keep_alive
        protocol.data_received(body + b"GET /predict?a=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert bytes(cycle.body) == body and not cycle.more_body
        assert len(protocol.started) == 1 and len(protocol.pipeline) == 1
        cycle.response_complete = True
        cycle.on_response()
        assert len(protocol.started) == 2
        second, app = protocol.started[1]
        assert app is protocol.app and second.scope["path"] == "/predict"
        assert not second.more_body and second.scope["query_string"] == b"a=1"
    finally:
        loop.close()


def test_past_the_connection_limit_the_app_is_another_one() -> None:
    """The fast lane takes only requests started with the protocol's own app: over
    ``limit_concurrency`` uvicorn starts its 503 app instead."""
    loop = asyncio.new_event_loop()
    try:
        protocol = _protocol(loop, limit_concurrency=1)
        protocol.data_received(b"GET /predict HTTP/1.1\r\nHost: gw\r\n\r\n")
        ((_cycle, app),) = protocol.started
        assert app is flow_control.service_unavailable and app is not protocol.app
    finally:
        loop.close()


def test_a_request_cycle_has_the_state_the_fast_lane_reads_and_writes() -> None:
    done: list[bool] = []
    scope: Any = {"type": "http", "headers": []}
    cycle = RequestResponseCycle(
        scope=scope, transport=_Transport(), flow=None,  # type: ignore[arg-type]
        logger=logging.getLogger("test"), access_logger=logging.getLogger("test"),
        access_log=False, default_headers=[], message_event=asyncio.Event(),
        expect_100_continue=True, keep_alive=False, on_response=lambda: done.append(True))
    assert cycle.scope is scope and cycle.body == bytearray() and cycle.more_body
    assert not cycle.response_started and not cycle.response_complete
    assert not cycle.disconnected and cycle.waiting_for_100_continue and not cycle.keep_alive
    assert isinstance(cycle.message_event, asyncio.Event)
    cycle.on_response()
    assert done == [True]


def test_status_lines_are_what_the_fast_lane_writes() -> None:
    assert set(STATUS_LINE) == set(range(100, 600))
    assert STATUS_LINE[200] == b"HTTP/1.1 200 OK\r\n"
    assert STATUS_LINE[408] == b"HTTP/1.1 408 Request Timeout\r\n"


def test_a_held_body_never_pauses_reading() -> None:
    """A request held by the fast lane is read by no ASGI ``receive``, which is what resumes
    reading: its body must not exceed the size past which uvicorn pauses reading (else
    re-check ``FAST_BODY_BYTES`` and ``FastLane.take`` in gateway/lane.py)."""
    from gateway.lane import FAST_BODY_BYTES

    assert FAST_BODY_BYTES <= flow_control.HIGH_WATER_LIMIT


def test_a_config_takes_the_gateway_protocol_class_and_no_websockets() -> None:
    from gateway.server import GatewayHttpProtocol

    config = _config(http=GatewayHttpProtocol, ws="none", limit_concurrency=3)
    assert config.http_protocol_class is GatewayHttpProtocol
    assert config.ws_protocol_class is None
    for name in ("timeout_graceful_shutdown", "timeout_worker_healthcheck", "limit_concurrency",
                 "workers", "uds"):
        assert hasattr(config, name), name


def test_a_signal_is_recorded_for_re_raising_at_exit() -> None:
    """``GatewayServer.capture_signals`` clears ``_captured_signals`` so the process exits 0
    after a graceful shutdown; uvicorn fills it in ``handle_exit``."""
    server = uvicorn.Server(_config())
    assert server._captured_signals == [] and not server.should_exit
    server.handle_exit(signal.SIGTERM, None)
    assert server._captured_signals == [signal.SIGTERM] and server.should_exit
    assert isinstance(server.server_state.default_headers, list)
    assert uvicorn.config.STARTUP_FAILURE == 3  # run()'s documented status


def test_the_lifespan_state_is_what_protocols_get_as_app_state() -> None:
    """``GatewayServer.shutdown`` finds the gateway (to drain it) in ``lifespan.state``, and
    ``FastLane.of`` finds its metrics in a protocol's ``app_state``: the same dict, the state the
    app's lifespan yielded (re-check ``GatewayServer.shutdown`` in gateway/server.py and
    ``FastLane.of`` in gateway/lane.py if this fails)."""
    config = _config()
    lifespan = config.lifespan_class(config)
    assert lifespan.state == {}
    assert "app_state=self.lifespan.state" in inspect.getsource(uvicorn.Server.startup)


def test_uvicorn_logs_where_the_gateway_routes_logs() -> None:
    """``gateway.logs.configure`` and ``gateway.server.log`` use uvicorn's logger names."""
    import uvicorn.protocols.http.httptools_impl as impl

    assert uvicorn.server.logger.name == "uvicorn.error"
    assert "uvicorn.access" in inspect.getsource(impl.HttpToolsProtocol.__init__)
