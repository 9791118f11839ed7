"""Serving the gateway with uvicorn (uvloop, httptools), hardened against slow clients and
with a shutdown that answers every request.

``run(...)`` is what ``python -m gateway`` calls. Compared with plain ``uvicorn.run``:

**Shutdown** (SIGTERM or SIGINT), in named phases within one grace period,
``GATEWAY_SHUTDOWN_GRACE_S``, shared by the server and the batchers:

1. *stop intake*: the listening sockets close (the gRPC door's too: new calls fail
   ``UNAVAILABLE``); idle connections close, busy ones will close after their response; the
   app's ``Gateway`` stops taking requests (503 ``shutting_down``);
2. *drain*: queued and running rows get what is left of the grace period to finish
   (``Gateway.drain``); rows that cannot finish fail with 503;
3. *finish responses*: requests still running (waiting on Redis, a thread without batching)
   get the rest of the grace period;
4. *fail leftovers*: whatever is still running is cancelled and answered 503 ``shutting_down``,
   never 500;
5. *close*: the app's lifespan shutdown (caches, connection pools).

A shutdown by signal then exits with status 0 (uvicorn re-raises the signal, which would end
the process with 128 + signal). With ``--workers N`` the gateway's own supervisor
(``gateway.supervisor``) runs one such server per worker process.

**Slow clients** (``GatewayHttpProtocol``): request headers must arrive within
``GATEWAY_HEADER_TIMEOUT_S`` of the connection (or of the request's first byte on a kept-alive
connection), a body within ``GATEWAY_BODY_TIMEOUT_S`` of its headers; past either the client
gets 408 and the connection is closed. Open connections are capped (``limit_concurrency``): a new
connection past the cap closes the one that has waited longest for request headers (a slow or
idle client), so the process never runs out of file descriptors, which would make the event
loop drop every waiting connection, good ones too. When every connection is busy with a
request, new requests get 503.

**Doors without a task.** Door requests with a small body are answered inside the protocol,
without an ASGI task: the fast lane, ``gateway.lane``.

The protocol and server extend uvicorn's own classes at the points its code offers (parser
callbacks, ``_start_asgi_task``, ``shutdown``); the tests
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
from collections.abc import Iterator
from enum import Enum
from typing import Any, cast

import uvicorn
from starlette.requests import ClientDisconnect
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from gateway.core.runner import ModelThreads
from gateway.errors import HttpError, Unavailable
from gateway.lane import FastLane, Held, doors_of, http_response
from gateway.protocols.http import error_reply, send_reply
from gateway.settings import Settings

__all__ = [
    "GatewayConfig",
    "GatewayHttpProtocol",
    "GatewayServer",
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
        self.lane: FastLane | None = None  # made by the first connection


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

    While a model's thread is alive (``ModelThreads.alive``), a write the transport would make
    at once (nothing buffered before it, a plain socket) is made with ``os.write``, which lets
    the GIL go during the system call (the event loop's transport keeps it): on loopback a send
    also runs the receiving side of TCP, tens of microseconds in which the model's thread can
    return from its call. Whatever the socket does not take goes to the transport, as do errors
    (which it reports as usual).
    """

    __slots__ = ("_fd", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        sock = transport.get_extra_info("socket")
        plain = sock is not None and transport.get_extra_info("sslcontext") is None
        self._fd: int = sock.fileno() if plain else -1

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
            self._send(pending[0] if len(pending) == 1 else b"".join(pending))

    def write_now(self, data: bytes) -> None:
        """Write ``data`` at once, after anything pending."""
        self.flush()
        if not self._transport.is_closing():
            self._send(data)

    def _send(self, data: bytes) -> None:
        transport = self._transport
        if ModelThreads.alive and self._fd >= 0 and not transport.get_write_buffer_size():
            try:
                sent = os.write(self._fd, data)
            except OSError:  # (would block, or the connection's error: the transport's)
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

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
        self._lane = self._lane_of(app_state)
        self._doors = doors_of(self.app)
        self.in_headers = False  # inside on_headers_complete (not a pipelined start)
        self.held: Held | None = None  # a door request waiting for its body (the fast lane)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._timed_out = False  # this connection was answered 408 by a timer

    def _lane_of(self, app_state: dict[str, Any]) -> FastLane | None:
        """The server's fast lane (made by its first connection), None for another app."""
        shared = self._shared
        if shared is not None and shared.lane is not None:
            return shared.lane
        lane = FastLane.of(self.app, app_state, self.loop, self.tasks)
        if shared is not None:
            shared.lane = lane
        return lane

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
        self.held = None
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
        self.in_headers = True
        try:
            super().on_headers_complete()
        finally:
            self.in_headers = False

    def on_message_complete(self) -> None:
        self._phase = _Phase.BETWEEN
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()
        if self.held is not None and self._lane is not None:
            self._lane.complete(self)

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
        if self._lane is not None:
            self._lane.release(self, self.app)
        super().shutdown()

    def _close(self, status: int, message: str) -> None:
        """Close the connection, first answering ``status`` when the request being received is
        owed an answer: its headers are incomplete (and no earlier request is still answering),
        or its body is incomplete and its app has not started answering. A request whose app is
        running is marked disconnected, so its own late answer is dropped."""
        self._cancel_timers()
        self._awaiting.pop(self, None)
        self.held = None
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
            self.transport.write(http_response(error_reply(HttpError(status, message)),
                                               self.server_state.default_headers, False))
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
        if app is self.app and self._lane is not None and self._lane.take(self, cycle):
            return
        self.start_task(cycle, app)

    def start_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        """Run ``app`` for ``cycle`` in uvicorn's ASGI task, guarded (``_guarded``)."""
        super()._start_asgi_task(cycle, functools.partial(self._guarded, cycle, app))

    @property
    def default_headers(self) -> list[tuple[bytes, bytes]]:
        return self.server_state.default_headers

    def write_now(self, data: bytes) -> None:
        self._out.write_now(data)

    def close_transport(self) -> None:
        self.transport.close()

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
            await self._unavailable(scope, send)
        except ClientDisconnect:
            if not self._timed_out:
                raise

    async def _unavailable(self, scope: Scope, send: ASGISendCallable) -> None:
        """Answer 503 ``shutting_down`` the way of the request's protocol, and close."""
        render = self._doors.renderer(cast(Any, scope)) if self._doors is not None \
            else error_reply
        reply = render(Unavailable("the server is shutting down and could not finish this "
                                   "request", code="shutting_down"))
        reply.headers.append((b"connection", b"close"))
        await send_reply(cast(Any, send), reply)


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
        state = getattr(self.lifespan, "state", {})
        grpc = state.get("grpc")  # the gRPC door: new calls refused, running ones get the grace
        grpc_stopped = asyncio.ensure_future(grpc.stop(self.grace_s)) if grpc else None
        gateway = state.get("gateway")
        # 2. Drain the batchers (the gateway refuses new requests from here on).
        if gateway is not None and not self.force_exit:
            await gateway.drain(max(0.0, deadline - loop.time()))
        # 3. Let running requests finish within the grace period (and those the drain has just
        #    answered write their answer).
        await self._wait_for_requests(max(deadline, loop.time() + _SETTLE_S))
        if grpc_stopped is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time()) + _SETTLE_S):
                    await asyncio.shield(grpc_stopped)
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
    """Serve ``app`` (an import string of an app factory) in this process until SIGTERM or
    SIGINT; return the process exit status (0 after a clean shutdown, 3 when startup failed).
    ``settings`` defaults to the environment's; ``config`` as for ``gateway_config``. (Several
    worker processes: ``gateway.workers.serve_workers``.)"""
    cfg = gateway_config(settings or Settings(), app, **config)
    server = GatewayServer(cfg)
    try:
        server.run()
    finally:
        if cfg.uds and os.path.exists(cfg.uds):
            os.remove(cfg.uds)
    return 0 if server.started else STARTUP_FAILURE
