"""The fast lane: door requests answered inside uvicorn's HTTP protocol, without an ASGI task.

A request for an inference door (``gateway.protocols.http``) with a small body
(``Content-Length`` up to ``FAST_BODY_BYTES``, no ``Expect: 100-continue``) is held by its
connection until its body is in (``FastLane.take``). The door requests completed during one
event-loop step are then answered together at its end by ``Doors.answer``: an answer that needs
no waiting (L1, or an inline model call, one for all their misses of a model) is written at once
by ``http_response``, the lane's one response writer, with no ASGI task, scope copy or
middleware. The requests that wait on the model are completed in groups, one task a group
(``Doors.together``: usually one for a step's new rows of a model), and each reply is written
by the same writer as soon as its group is done; a sampled request (tracing) continues in an
ordinary task of its connection, in its own trace context. uvicorn's keep-alive, pipelining,
``Connection: close`` and default headers apply as for any response. A group's task is one of
the server's tasks: the shutdown waits for it, and cancelling it answers its requests 503
``shutting_down`` and closes their connections.

``gateway_fast_lane_requests_total{how}`` counts the door requests the lane took (``answered``
at once, ``continued`` after waiting); ``gateway_fast_lane_bypassed_total{reason}`` those started
in an ASGI task instead (a large, chunked or 100-continue body; a pipelined request whose body
had not all arrived when the earlier response ended; a request held when shutdown began).

The lane relies on uvicorn's request cycle (``RequestResponseCycle``: its scope, body, flags and
``on_response``); ``tests/contracts/test_uvicorn.py`` fails, naming what to re-check here, when
that code changes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol, cast

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from gateway.metrics import Metrics
from gateway.protocols.http import Door, Doors, Reply, Waiting

if TYPE_CHECKING:
    from prometheus_client import Counter

__all__ = ["FAST_BODY_BYTES", "Connection", "FastLane", "doors_of", "http_response"]

log = logging.getLogger("uvicorn.error")

FAST_BODY_BYTES = 65_536  # uvicorn pauses reading past it (flow_control.HIGH_WATER_LIMIT)

Held = tuple[RequestResponseCycle, Door, dict[str, str]]
Continued = tuple["Connection", RequestResponseCycle, Waiting]


class Connection(Protocol):
    """What the lane needs of a connection (``gateway.server.GatewayHttpProtocol``)."""

    held: Held | None  # a door request waiting for the rest of its body
    in_headers: bool  # inside the parser's headers callback (not a pipelined start)

    @property
    def default_headers(self) -> list[tuple[bytes, bytes]]:
        """uvicorn's default response headers (server, date)."""

    def write_now(self, data: bytes) -> None:
        """Write ``data`` at once."""

    def close_transport(self) -> None:
        """Close the connection once what was written is sent."""

    def start_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        """Run ``app`` for ``cycle`` in an ASGI task, as uvicorn does."""


class FastLane:
    """One server's fast lane: its doors, counters and the requests of the current step."""

    __slots__ = ("_answered", "_bypassed", "_continued", "_doors", "_loop", "_step", "_tally",
                 "_tasks")

    def __init__(self, doors: Doors, metrics: Metrics, loop: asyncio.AbstractEventLoop,
                 tasks: set[asyncio.Task[None]]) -> None:
        """``tasks``: the server's request tasks (the shutdown waits for them, then cancels
        what is left), where the lane's group tasks go too."""
        self._doors = doors
        self._loop = loop
        self._tasks = tasks
        self._tally = metrics.tally
        self._answered = metrics.fast_lane.labels("answered")
        self._continued = metrics.fast_lane.labels("continued")
        self._bypassed: dict[str, Counter] = {
            reason: metrics.fast_lane_bypassed.labels(reason)
            for reason in ("body", "pipelined", "shutdown")}
        self._step: list[tuple[Connection, RequestResponseCycle, Door, dict[str, str],
                               bytes]] = []

    @staticmethod
    def of(app: Any, app_state: dict[str, Any], loop: asyncio.AbstractEventLoop,
           tasks: set[asyncio.Task[None]]) -> FastLane | None:
        """The lane for the gateway ``app`` whose lifespan state is ``app_state``; None for
        another app (or before its gateway is open)."""
        doors = doors_of(app)
        metrics = getattr(app_state.get("gateway"), "metrics", None)
        if doors is None or not isinstance(metrics, Metrics):
            return None
        return FastLane(doors, metrics, loop, tasks)

    def take(self, conn: Connection, cycle: RequestResponseCycle) -> bool:
        """Take a request whose headers are in: hold it until its body is in (``complete``),
        or queue it for this step's end if its body is in already. False: not a door
        request, or one the lane cannot take (counted): start it in an ASGI task."""
        found = self._doors.match(cast(Any, cycle.scope))
        if found is None or found[0] is None:
            return False
        small = _small_body(cycle)
        if small and conn.in_headers:
            conn.held = (cycle, found[0], found[1])
            return True
        if small and not cycle.more_body and conn.held is None:
            self._queue(conn, cycle, found[0], found[1])  # pipelined, its body in
            return True
        # (A pipelined body still arriving: reading is paused until the ASGI task's receive
        # resumes it.)
        self.bypassed("pipelined" if small else "body")
        return False

    def complete(self, conn: Connection) -> None:
        """The held request's body is in: queue it for this step's end."""
        if conn.held is not None:
            held, conn.held = conn.held, None
            self._queue(conn, *held)

    def release(self, conn: Connection, app: ASGI3Application) -> None:
        """Hand the held request to an ordinary task running ``app`` (shutdown: it is
        answered there)."""
        if conn.held is not None:
            cycle = conn.held[0]
            conn.held = None
            self.bypassed("shutdown")
            conn.start_task(cycle, app)

    def bypassed(self, reason: str) -> None:
        """Count a door request started in an ASGI task instead of the lane."""
        self._tally.inc(self._bypassed[reason])

    def _queue(self, conn: Connection, cycle: RequestResponseCycle, door: Door,
               params: dict[str, str]) -> None:
        if not self._step:
            self._loop.call_soon(self._answer_step)
        self._step.append((conn, cycle, door, params, bytes(cycle.body)))

    def _answer_step(self) -> None:
        """Answer the requests of the step that has just ended, together: under load every
        ready connection has a request, and the misses of one model are computed in one call
        rather than one call each."""
        items, self._step = self._step, []
        try:
            answers: list[Reply | Waiting] = self._doors.answer(
                [(door, params, cast(Any, cycle.scope), body)
                 for _, cycle, door, params, body in items])
        except Exception as exc:  # a fault of the gateway's own: every request still answered
            log.error("Exception in ASGI application\n", exc_info=exc)
            answers = [Reply(500, b"Internal Server Error",
                             content_type=b"text/plain; charset=utf-8")] * len(items)
        waiting: list[Continued] = []
        for (conn, cycle, *_), now in zip(items, answers, strict=True):
            if type(now) is Reply:
                self._tally.inc(self._answered)
                self._write(conn, cycle, now)
            elif isinstance(now, Waiting):
                self._tally.inc(self._continued)
                if now.traced:
                    self._continue_alone(conn, cycle, now)
                else:
                    waiting.append((conn, cycle, now))
        if waiting:
            for group in self._doors.together([w for _, _, w in waiting]):
                task = self._loop.create_task(self._finish([waiting[n] for n in group]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _continue_alone(self, conn: Connection, cycle: RequestResponseCycle,
                        waiting: Waiting) -> None:
        """Complete a waiting request in an ASGI task of its connection."""
        finish = self._doors.finisher(waiting)

        async def app(_scope: Scope, _receive: ASGIReceiveCallable,
                      send: ASGISendCallable) -> None:
            await finish(cast(Any, send))

        conn.start_task(cycle, app)

    async def _finish(self, group: list[Continued]) -> None:
        """Complete a group of waiting requests and write each reply; cancelled (shutdown),
        answer each 503 ``shutting_down`` and close its connection."""
        waiting = [w for _, _, w in group]
        try:
            replies = await self._doors.finish_many(waiting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            replies = [self._doors.shutting_down(w) for w in waiting]
            for _, cycle, _ in group:
                cycle.keep_alive = False
        for (conn, cycle, _), reply in zip(group, replies, strict=True):
            self._write(conn, cycle, reply)

    def _write(self, conn: Connection, cycle: RequestResponseCycle, now: Reply) -> None:
        """Write a door's reply (``http_response``) and end the request's cycle."""
        cycle.response_started = cycle.response_complete = True
        conn.write_now(http_response(now, conn.default_headers, cycle.keep_alive))
        if not cycle.keep_alive:
            conn.close_transport()
        cycle.on_response()


def doors_of(app: Any) -> Doors | None:
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
    most ``FAST_BODY_BYTES``), with no ``100 Continue`` owed first?"""
    if cycle.waiting_for_100_continue:
        return False
    for name, value in cycle.scope["headers"]:
        if name == b"content-length":
            if not (0 < len(value) <= 6 and value.isdigit() and int(value) <= FAST_BODY_BYTES):
                return False
        elif name == b"transfer-encoding":
            return False
    return True


def http_response(reply: Reply, default_headers: list[tuple[bytes, bytes]],
                  keep_alive: bool) -> bytes:
    """``reply`` as HTTP/1.1 bytes, with uvicorn's default headers (server, date), and
    ``connection: close`` unless ``keep_alive``."""
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
