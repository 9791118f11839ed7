"""Serving the gateway with uvicorn (uvloop, httptools), hardened against slow clients and
with a shutdown that answers every request.

``run(...)`` is what ``python -m gateway`` calls. Compared with plain ``uvicorn.run``:

**Shutdown** (SIGTERM or SIGINT), in named phases within one grace period,
``GATEWAY_SHUTDOWN_GRACE_S``, shared by the server and the batchers:

1. *stop intake*: the listening sockets close; idle connections close, busy ones will close
   after their response; the app's ``Gateway`` stops taking requests (503 ``shutting_down``);
2. *drain*: queued and running rows get what is left of the grace period to finish
   (``Gateway.drain``); rows that cannot finish fail with 503;
3. *finish responses*: requests still running (waiting on Redis, a thread without batching)
   get the rest of the grace period;
4. *fail leftovers*: whatever is still running is cancelled and answered 503 ``shutting_down``,
   never 500;
5. *close*: the app's lifespan shutdown (caches, connection pools).

A shutdown by signal then exits with status 0 (uvicorn re-raises the signal, which would end
the process with 128 + signal). With ``workers > 1`` uvicorn's supervisor runs one such server
per worker process.

**Slow clients** (``GatewayHttpProtocol``): request headers must arrive within
``GATEWAY_HEADER_TIMEOUT_S`` of the connection (or of the request's first byte on a kept-alive
connection), a body within ``GATEWAY_BODY_TIMEOUT_S`` of its headers; past either the client
gets 408 and the connection is closed. Open connections are capped (``limit_concurrency``): a new
connection past the cap closes the one that has waited longest for request headers (a slow or
idle client), so the process never runs out of file descriptors, which would make the event
loop drop every waiting connection, good ones too. When every connection is busy with a
request, new requests get 503.

**Doors without a task.** A request for an inference door (``gateway.protocols.http``) with a
small body (``Content-Length`` up to ``_FAST_BODY_BYTES``, no ``Expect: 100-continue``) is held
until its body is in. The door requests completed during one event-loop step are then run
together at its end by ``Doors.answer_many`` (``_Tick``): an answer that needs no waiting (L1,
or an inline model call, one for all their misses of a model) is written at once, with no ASGI
task, scope copy or middleware; anything else continues in an ordinary task. uvicorn's
keep-alive, pipelining, ``Connection: close`` and default headers apply as for any response.
``gateway_fast_lane_requests_total{how}`` counts the door requests the lane took (``answered``
at once, ``continued`` in a task); ``gateway_fast_lane_bypassed_total{reason}`` those started
in an ASGI task instead (a large, chunked or 100-continue body; a pipelined request whose
body had not all arrived when the earlier response ended; a request held when shutdown
began).

The protocol, server and supervisor extend uvicorn's own classes at the points its code offers
(parser callbacks, ``_start_asgi_task``, ``shutdown``, the worker process factory); the tests
in ``tests/hardening`` hold them to the behaviour above against real processes, and
``tests/contracts/test_uvicorn.py`` fails, naming what to re-check here, when uvicorn's code
at those points changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from enum import Enum
from typing import Any, cast

import orjson
import uvicorn
from starlette.requests import ClientDisconnect
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from gateway.metrics import Metrics
from gateway.protocols.http import Door, Doors, Reply
from gateway.settings import Settings

__all__ = [
    "GatewayConfig",
    "GatewayHttpProtocol",
    "GatewayServer",
    "GatewaySupervisor",
    "default_connection_limit",
    "gateway_config",
    "run",
]

log = logging.getLogger("uvicorn.error")

_FD_RESERVE = 128  # descriptors kept for Redis, model files, logs, the loop itself
_SETTLE_S = 0.5  # after the drain: time for answers already decided to be written
_CANCEL_WAIT_S = 2.0  # how long cancelled leftovers get to write their 503


def default_connection_limit() -> int:
    """Connections one process can hold without running out of file descriptors: the soft
    open-file limit less a reserve (an eighth, at least 128)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65_536
    return max(1, soft - max(_FD_RESERVE, soft // 8))


class GatewayConfig(uvicorn.Config):
    """``uvicorn.Config`` plus the gateway's connection and shutdown bounds (seconds)."""

    def __init__(
        self,
        app: Any,
        *,
        header_timeout_s: float | None = None,
        body_timeout_s: float | None = None,
        shutdown_grace_s: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.shutdown_grace_s = shutdown_grace_s


class GatewayServerState(ServerState):
    """uvicorn's shared server state, plus what the gateway's protocol shares."""

    def __init__(self) -> None:
        super().__init__()
        # Connections waiting for a request's headers (fresh, idle or slow), oldest first:
        # the ones closed to make room for a new connection past the cap.
        self.awaiting_headers: OrderedDict[GatewayHttpProtocol, None] = OrderedDict()
        # Set when shutdown cancels the requests left after the grace period: those answer 503.
        self.failing_leftovers = False
        # Set whenever the last open connection closes.
        self.all_closed = asyncio.Event()
        self.tick: _Tick | None = None  # door requests of this event-loop step
        self.lane: _Lane | None = None  # the fast lane's counters, made by the first connection


class _Phase(Enum):
    BETWEEN = 0  # no request being received
    HEADERS = 1  # a request's first bytes are in, its headers are not complete
    BODY = 2  # headers complete, body not complete


class _OneWrite:
    """A transport that sends what a response writes as one ``write`` (one system call).

    uvicorn writes a response's head and its body separately; on a cached answer the second
    system call costs more than the gateway's own work. Writes are joined until the response
    is complete (or, for a streamed one, until the event loop's next step) and go out in one
    piece; closing flushes first. Everything else is the wrapped transport's.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def write_now(self, data: bytes) -> None:
        """Write ``data`` at once, after anything pending."""
        self.flush()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body timeouts (408), a connection cap
    that makes room by closing the connection waiting longest for headers (module docstring),
    and each response sent in one system call (``_OneWrite``).

    Besides the header timer of a new connection, timers are armed only when a request is still
    incomplete at the end of a read, so a request that arrives in one read costs no timer.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timeout: float | None = getattr(config, "header_timeout_s", None)
        self._body_timeout: float | None = getattr(config, "body_timeout_s", None)
        self._cap: int | None = config.limit_concurrency
        if self._cap is not None:
            # uvicorn answers 503 once len(connections) >= limit_concurrency; the cap admits
            # `cap` connections, so refuse only past it (when nothing could be closed for room).
            self.limit_concurrency = self._cap + 1
        self._shared = server_state if isinstance(server_state, GatewayServerState) else None
        self._awaiting: OrderedDict[GatewayHttpProtocol, None] = (
            self._shared.awaiting_headers if self._shared is not None else OrderedDict()
        )
        self._phase = _Phase.BETWEEN
        self._doors = _doors_of(self.app)
        self._lane = _Lane.of(app_state, self._shared) if self._doors is not None else None
        self._in_headers = False  # inside on_headers_complete (not a pipelined start)
        # A door request waiting for its body: its cycle, door and path parameters.
        self._held: tuple[RequestResponseCycle, Door, dict[str, str]] | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._timed_out = False  # this connection was answered 408 by a timer

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._out = _OneWrite(transport, self.loop)
        super().connection_made(self._out)  # type: ignore[arg-type]
        self._awaiting[self] = None
        if self._header_timeout is not None:
            self._header_timer = self.loop.call_later(self._header_timeout, self._too_slow)
        if self._cap is not None and len(self.connections) > self._cap:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._held = None
        self._cancel_timers()
        self._awaiting.pop(self, None)
        super().connection_lost(exc)
        if self._shared is not None and not self.connections:
            self._shared.all_closed.set()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._phase is _Phase.HEADERS and self._header_timer is None \
                and self._header_timeout is not None:
            self._header_timer = self.loop.call_later(self._header_timeout, self._too_slow)
        elif self._phase is _Phase.BODY and self._body_timer is None \
                and self._body_timeout is not None:
            self._body_timer = self.loop.call_later(self._body_timeout, self._too_slow)

    # -- parser callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _Phase.HEADERS

    def on_headers_complete(self) -> None:
        self._phase = _Phase.BODY
        self._awaiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._in_headers = True
        try:
            super().on_headers_complete()
        finally:
            self._in_headers = False

    def on_message_complete(self) -> None:
        self._phase = _Phase.BETWEEN
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()
        if self._held is not None:
            held, self._held = self._held, None
            self._answer_now(*held)

    def on_response_complete(self) -> None:
        self._out.flush()
        super().on_response_complete()  # may start the next pipelined request
        cycle = self.cycle
        if self._phase is _Phase.BETWEEN and not self.pipeline \
                and (cycle is None or cycle.response_complete) \
                and not self.transport.is_closing():
            self._awaiting[self] = None  # idle: first to go when room is needed

    # -- limits ------------------------------------------------------------------------------
    def _make_room(self) -> None:
        """Close the connection that has waited longest for request headers (not this one)."""
        for victim in self._awaiting:
            if victim is not self:
                victim._close(408, "closed to make room for another connection")
                return

    def _too_slow(self) -> None:
        """A header or body timer fired."""
        if self._phase is _Phase.BODY:
            self._body_timer = None
            self._close(408, f"request body not received within {self._body_timeout:g} s")
        else:
            self._header_timer = None
            self._close(408, f"request headers not received within {self._header_timeout:g} s")

    def shutdown(self) -> None:
        self._release()
        super().shutdown()

    def _close(self, status: int, message: str) -> None:
        """Close the connection, first answering ``status`` when the request being received is
        owed an answer: its headers are incomplete (and no earlier request is still answering),
        or its body is incomplete and its app has not started answering. A request whose app is
        running is marked disconnected, so its own late answer is dropped."""
        self._cancel_timers()
        self._awaiting.pop(self, None)
        self._held = None
        if self.transport.is_closing():
            return
        cycle: RequestResponseCycle | None = self.cycle
        running = cycle is not None and not cycle.response_complete
        if self._phase is _Phase.HEADERS:
            owed = not running
        elif self._phase is _Phase.BODY:
            owed = running and cycle is not None and not cycle.response_started
        else:
            owed = False
        if owed:
            self._timed_out = True
            self.transport.write(_raw_response(status, message, self.server_state))
        if running and cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()
        # Count it gone now, not when the transport has flushed: the cap and uvicorn's 503 rule
        # look at this set, and the new connection that made room must not be refused.
        self.connections.discard(self)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    # -- requests ----------------------------------------------------------------------------
    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if app is self.app and self._doors is not None:
            found = self._doors.match(cycle.scope)  # type: ignore[arg-type]
            if found is not None and found[0] is not None:
                small = _small_body(cycle)
                if small and self._in_headers:
                    self._held = (cycle, found[0], found[1])
                    return  # until on_message_complete
                if small and not cycle.more_body and self._held is None:
                    self._answer_now(cycle, found[0], found[1])  # pipelined, its body in
                    return
                # (A pipelined body still arriving: reading is paused until the ASGI task's
                # receive resumes it.)
                self._bypassed("pipelined" if small else "body")
        super()._start_asgi_task(cycle, functools.partial(self._guarded, cycle, app))

    def _bypassed(self, reason: str) -> None:
        """Count a door request started in an ASGI task instead of the fast lane."""
        if self._lane is not None:
            self._lane.tally.inc(self._lane.bypassed[reason])

    def _release(self) -> None:
        """Hand a held door request to an ordinary task (shutdown: it is answered there)."""
        if self._held is not None:
            cycle = self._held[0]
            self._held = None
            self._bypassed("shutdown")
            super()._start_asgi_task(cycle, functools.partial(self._guarded, cycle, self.app))

    def _answer_now(self, cycle: RequestResponseCycle, door: Door, params: dict[str, str]
                    ) -> None:
        """Run a held door request whose body is in, with the others that came in during
        this event-loop step (``_Tick``)."""
        assert self._doors is not None
        if self._shared is None:
            scope: Any = cycle.scope
            self.deliver(cycle, self._doors.answer_now(door, params, scope, bytes(cycle.body)))
            return
        if self._shared.tick is None:
            self._shared.tick = _Tick(self.loop, self._doors)
        self._shared.tick.add(self, cycle, door, params)

    def deliver(self, cycle: RequestResponseCycle,
                now: Reply | Callable[[Any], Awaitable[None]]) -> None:
        """Write a door's reply now, or continue the request in a task when it has to
        wait."""
        lane = self._lane
        if not isinstance(now, Reply):
            if lane is not None:
                lane.tally.inc(lane.continued)
            finish = now

            async def app(_scope: Scope, _receive: ASGIReceiveCallable,
                          send: ASGISendCallable) -> None:
                await finish(send)

            super()._start_asgi_task(cycle, functools.partial(self._guarded, cycle, app))
            return
        if lane is not None:
            lane.tally.inc(lane.answered)
        cycle.response_started = cycle.response_complete = True
        self._out.write_now(_http_response(now, self.server_state.default_headers,
                                           cycle.keep_alive))
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()

    async def _guarded(
        self,
        cycle: RequestResponseCycle,
        app: ASGI3Application,
        scope: Scope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        """Run ``app``; a request cancelled by shutdown before it answered gets 503, and one
        whose client this protocol timed out ends quietly (it was answered 408)."""
        try:
            await app(scope, receive, send)
        except asyncio.CancelledError:
            if self._shared is None or not self._shared.failing_leftovers \
                    or cycle.response_started or cycle.disconnected:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await _send_unavailable(scope, send)
        except ClientDisconnect:
            if not self._timed_out:
                raise


_FAST_BODY_BYTES = 16_384


def _doors_of(app: Any) -> Doors | None:
    """The gateway app's doors, under whatever middleware uvicorn wrapped it in."""
    for _ in range(8):
        doors = getattr(app, "doors", None)
        if isinstance(doors, Doors):
            return doors
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def _small_body(cycle: RequestResponseCycle) -> bool:
    """Will the whole body be in without the app reading it (none, or a declared length of at
    most ``_FAST_BODY_BYTES``), with no ``100 Continue`` owed first?"""
    if cycle.waiting_for_100_continue:
        return False
    for name, value in cycle.scope["headers"]:
        if name == b"content-length":
            if not (0 < len(value) <= 6 and value.isdigit() and int(value) <= _FAST_BODY_BYTES):
                return False
        elif name == b"transfer-encoding":
            return False
    return True


def _http_response(reply: Reply, default_headers: list[tuple[bytes, bytes]],
                   keep_alive: bool) -> bytes:
    """``reply`` as HTTP/1.1 bytes, with uvicorn's default headers (server, date)."""
    head = [STATUS_LINE[reply.status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: ", reply.content_type, b"\r\ncontent-length: ",
             str(len(reply.body)).encode(), b"\r\n"]
    for name, value in reply.headers:
        head += [name, b": ", value, b"\r\n"]
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head += [b"\r\n", reply.body]
    return b"".join(head)


def _error_body(scope: Scope, code: str, message: str) -> bytes:
    """The gateway's error body: ``{"error": "…"}`` under ``/v2``, else code and message."""
    path = scope.get("path")
    if isinstance(path, str) and path.startswith("/v2"):
        return orjson.dumps({"error": message})
    return orjson.dumps({"error": {"code": code, "message": message}})


async def _send_unavailable(scope: Scope, send: ASGISendCallable) -> None:
    body = _error_body(scope, "shutting_down",
                       "the server is shutting down and could not finish this request")
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _raw_response(status: int, message: str, state: ServerState) -> bytes:
    body = orjson.dumps({"error": {"code": "request_timeout", "message": message}})
    head = [STATUS_LINE[status]]
    for name, value in state.default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
             b"\r\nconnection: close\r\n\r\n", body]
    return b"".join(head)


class GatewayServer(uvicorn.Server):
    """``uvicorn.Server`` with the gateway's shutdown phases and exit status (module
    docstring)."""

    server_state: GatewayServerState

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.server_state = GatewayServerState()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # The signal was handled by a graceful shutdown: do not raise it again on the way
            # out, so the process exits with status 0.
            self._captured_signals.clear()

    @property
    def grace_s(self) -> float:
        grace = getattr(self.config, "shutdown_grace_s", None)
        if grace is None:
            grace = self.config.timeout_graceful_shutdown or 0
        return float(grace)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        log.info("Shutting down (grace period %.1f s)", self.grace_s)
        # 1. Stop intake.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        gateway = getattr(self.lifespan, "state", {}).get("gateway")
        # 2. Drain the batchers (the gateway refuses new requests from here on).
        if gateway is not None and not self.force_exit:
            await gateway.drain(max(0.0, deadline - loop.time()))
        # 3. Let running requests finish within the grace period (and those the drain has just
        #    answered write their answer).
        await self._wait_for_requests(max(deadline, loop.time() + _SETTLE_S))
        # 4. Fail what is left with 503.
        await self._fail_leftovers()
        await self._wait_for_connections(_CANCEL_WAIT_S)
        # 5. The app's own shutdown.
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _wait_for_requests(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.server_state.tasks and not self.force_exit:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.wait(set(self.server_state.tasks), timeout=remaining)

    async def _fail_leftovers(self) -> None:
        tasks = set(self.server_state.tasks)
        if not tasks:
            return
        log.warning("%d request(s) still running after the %.1f s grace period: answering 503",
                    len(tasks), self.grace_s)
        self.server_state.failing_leftovers = True
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=_CANCEL_WAIT_S)

    async def _wait_for_connections(self, timeout_s: float) -> None:
        """Let answered connections flush their last bytes and close."""
        if not self.server_state.connections or self.force_exit:
            return
        self.server_state.all_closed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.server_state.all_closed.wait()


class _Tick:
    """Door requests whose body came in during one event-loop step, answered together at its
    end (``Doors.answer_many``): under load every ready connection has a request, and the
    misses of one model are computed in one call rather than one call each."""

    __slots__ = ("_doors", "_items", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, doors: Doors) -> None:
        self._loop = loop
        self._doors = doors
        self._items: list[tuple[GatewayHttpProtocol, RequestResponseCycle, Door,
                                dict[str, str], bytes]] = []

    def add(self, protocol: GatewayHttpProtocol, cycle: RequestResponseCycle, door: Door,
            params: dict[str, str]) -> None:
        if not self._items:
            self._loop.call_soon(self._flush)
        self._items.append((protocol, cycle, door, params, bytes(cycle.body)))

    def _flush(self) -> None:
        items, self._items = self._items, []
        try:
            answers: list[Any] = self._doors.answer_many(
                [(door, params, cast(Any, cycle.scope), body)
                 for _, cycle, door, params, body in items])
        except Exception as exc:  # a fault of the gateway's own: every request still answered
            log.error("Exception in ASGI application\n", exc_info=exc)
            answers = [Reply(500, b"Internal Server Error",
                             content_type=b"text/plain; charset=utf-8")] * len(items)
        for (protocol, cycle, *_), now in zip(items, answers, strict=True):
            protocol.deliver(cycle, now)


class _Lane:
    """The fast lane's counters (``Metrics.fast_lane``, ``Metrics.fast_lane_bypassed``),
    counted through the app's per-loop tally: a dict increment per request."""

    __slots__ = ("answered", "bypassed", "continued", "tally")

    def __init__(self, metrics: Metrics) -> None:
        self.tally = metrics.tally
        self.answered = metrics.fast_lane.labels("answered")
        self.continued = metrics.fast_lane.labels("continued")
        self.bypassed = {reason: metrics.fast_lane_bypassed.labels(reason)
                         for reason in ("body", "pipelined", "shutdown")}

    @staticmethod
    def of(app_state: dict[str, Any], shared: GatewayServerState | None) -> _Lane | None:
        """The counters of the app whose lifespan state is ``app_state`` (None without its
        gateway), made once per server."""
        if shared is not None and shared.lane is not None:
            return shared.lane
        metrics = getattr(app_state.get("gateway"), "metrics", None)
        if not isinstance(metrics, Metrics):
            return None
        lane = _Lane(metrics)
        if shared is not None:
            shared.lane = lane
        return lane


class _GatewayProcess(Process):
    """uvicorn's worker process, running a ``GatewayServer``."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = GatewayServer(config=self.config)
        return self._server


class GatewaySupervisor(Multiprocess):
    """uvicorn's supervisor of ``workers`` processes, each running a ``GatewayServer``.

    uvicorn creates its worker processes in these four places; each is uvicorn's own code with
    ``_GatewayProcess`` in place of ``Process``."""

    def _spawn(self) -> _GatewayProcess:
        process = _GatewayProcess(self.config, self.sockets)
        process.start()
        return process

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(self._spawn())

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error("Child process [%s] failed to start, stopping the parent process.",
                          process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.info("Child process [%s] died", process.pid)
            self.processes[idx] = self._spawn()

    def restart_all(self) -> None:
        for idx, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._spawn()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    log.error("New child process [%s] was not ready in time; keeping worker "
                              "[%s] and aborting the restart.", new.pid, old.pid)
                return
            old.terminate()
            old.join()
            self.processes[idx] = new

    def handle_ttin(self) -> None:
        log.info("Received SIGTTIN, increasing the number of processes.")
        self.processes_num += 1
        self.processes.append(self._spawn())


def gateway_config(settings: Settings, app: str = "gateway.app:from_env",
                   **config: Any) -> GatewayConfig:
    """The uvicorn configuration ``run`` serves with: ``config`` (``host``, ``port``,
    ``workers``, ``log_level``, … as for ``uvicorn.Config``) over the gateway's defaults:
    uvloop, the gateway's httptools protocol, no WebSocket upgrades, no access log, and the
    connection bounds and grace period of ``settings``."""
    options: dict[str, Any] = {
        "factory": True,
        "loop": "uvloop",
        "http": GatewayHttpProtocol,
        "ws": "none",  # no WebSocket routes: an upgrade request is an ordinary request
        "access_log": False,
        "limit_concurrency": settings.limit_concurrency or default_connection_limit(),
        "header_timeout_s": settings.header_timeout_s,
        "body_timeout_s": settings.body_timeout_s,
        "shutdown_grace_s": settings.shutdown_grace_s,
        **config,
    }
    return GatewayConfig(app, **options)


def run(app: str = "gateway.app:from_env", *, settings: Settings | None = None,
        **config: Any) -> int:
    """Serve ``app`` (an import string of an app factory) until SIGTERM or SIGINT; return the
    process exit status (0 after a clean shutdown, 3 when startup failed). ``settings``
    defaults to the environment's; ``config`` as for ``gateway_config``."""
    cfg = gateway_config(settings or Settings(), app, **config)
    if cfg.workers > 1:
        sock = cfg.bind_socket()
        GatewaySupervisor(cfg, sockets=[sock]).run()
        return 0
    server = GatewayServer(cfg)
    try:
        server.run()
    finally:
        if cfg.uds and os.path.exists(cfg.uds):
            os.remove(cfg.uds)
    return 0 if server.started else STARTUP_FAILURE
