"""Plain-ASGI plumbing for the inference doors: routing, bounded bodies, replies, metrics.

The doors that carry predictions (``GET /predict``, ``POST /v1/models/{name}/predict``,
``POST /v2/models/{name}[/versions/{v}]/infer``, KServe's ``POST /v1/models/{name}:predict``)
are answered here, ahead of FastAPI's middleware, routing and telemetry layers, which cost more
than a whole cached answer. A door is a protocol adapter: ``prepare`` decodes a request into a
``Job`` (model version, rows, outputs wanted, deadline), ``encode`` turns the pipeline's answer
into a ``Reply``, ``render_error`` renders a ``GatewayError`` the protocol's way. ``Doors``
matches the request, runs it through the one collaborator underneath (``Gateway.begin``, then
``Gateway.finish`` if it has to wait), counts and times it like every other route, and answers
405 for a door's path with another method. Anything else goes on to FastAPI; its errors are
rendered the way of the protocol whose path it is (``Doors.renderer``).

``Doors.answer`` runs the requests that arrived together as far as they go without waiting:
the server's fast lane (``gateway.lane``) calls it at the end of each event-loop step, so an
answer held by L1, or computed inline by a model measured to take microseconds, is written
without an ASGI task at all; ``Doors.serve`` is the same path for a request in an ASGI task.
The requests of a step that wait on the model are completed in groups (``Doors.together``,
``Doors.finish_many``): one task, one single-flight call and one batcher entry a group rather
than one each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from prometheus_client import Counter
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import logs
from gateway.core.batcher import Failure
from gateway.core.pipeline import Answer, Pending
from gateway.core.runner import ModelRunner, Output
from gateway.errors import (
    BodyTooLarge,
    GatewayError,
    InvalidInput,
    MethodNotAllowed,
    Unavailable,
    error_body,
)
from gateway.metrics import Metrics
from gateway.runtime import Gateway
from gateway.tracing import RequestTrace, Traced

__all__ = ["ClientGone", "Decoded", "Door", "Doors", "Encode", "Finish", "HttpRequest", "Job",
           "Prepare", "Renderer", "Reply", "Waiting", "as_response", "error_reply", "send_reply",
           "timeout_s"]

log = logging.getLogger("gateway.doors")

_JSON = b"application/json"
_MAX_LENGTH_DIGITS = 18
_MATCH_MEMO = 1024


@dataclass(slots=True)
class Reply:
    """An answer: status, body, content type and extra headers (lower-case names)."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = _JSON
    model: str | None = None  # for the access log: which model version answered, and from
    version: str | None = None  # which tier (the slowest of the rows: miss, l2, l1)
    cache: str | None = None


def error_reply(exc: GatewayError) -> Reply:
    """The gateway's own error answer: ``{"error": {"code", "message"}}``."""
    return Reply(exc.status, orjson.dumps(error_body(exc)),
                 [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()])


def as_response(reply: Reply) -> Response:
    """``reply`` as a Starlette response (for the routes FastAPI answers)."""
    return Response(reply.body, reply.status,
                    headers={k.decode("latin-1"): v.decode("latin-1") for k, v in reply.headers},
                    media_type=reply.content_type.decode("latin-1"))


class ClientGone(Exception):
    """The client disconnected before its body was read; nothing is to be sent."""


class HttpRequest:
    """One HTTP request's scope and body stream, with bounded readers."""

    __slots__ = ("_receive", "scope")

    def __init__(self, scope: Scope, receive: Receive | None) -> None:
        self.scope = scope
        self._receive = receive

    def header(self, name: bytes) -> bytes | None:
        """The last value of header ``name`` (lower-case), or None."""
        found = None
        for k, v in self.scope["headers"]:
            if k == name:
                found = v
        return found

    async def body(self, limit: int) -> bytes:
        """The whole body, refused with 413 as soon as it exceeds ``limit`` bytes (by
        ``Content-Length`` before reading, or while reading a chunked body).

        Raises:
            BodyTooLarge: over ``limit``.
            InvalidInput: a ``Content-Length`` that is not a plain decimal number.
            ClientGone: the client disconnected first.
        """
        declared = self.header(b"content-length")
        if declared is not None:
            if not (0 < len(declared) <= _MAX_LENGTH_DIGITS and declared.isdigit()):
                raise InvalidInput(f"Content-Length {declared.decode('latin-1')!r:.30} is not "
                                   "a decimal number", code="invalid_header")
            if int(declared) > limit:
                raise BodyTooLarge(f"body of {int(declared)} bytes exceeds the limit of "
                                   f"{limit} bytes")
        chunks: list[bytes] = []
        size = 0
        assert self._receive is not None, "a request built without its body stream"
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def timeout_s(gw: Gateway, req: HttpRequest) -> float:
    """The request's deadline: ``X-Request-Timeout-Ms`` or the gateway's default."""
    return gw.timeout_s(req.header(b"x-request-timeout-ms"))


class Decoded:
    """Requests already decoded by one door: decoding is a pure function of the request's
    bytes and of what the model version expects, and a hot request arrives again and again
    byte for byte. A request is kept from the second time it is decoded on (the first time
    only its hash is remembered), so traffic of new requests leaves nothing behind for the
    garbage collector to traverse over and over. Bounded in entries and in the size of what
    is kept (a bigger request is decoded every time); cleared when full. Values must not be
    changed by their users (arrays are made read-only)."""

    __slots__ = ("_entries", "_max_bytes", "_max_entries", "_seen")

    def __init__(self, max_entries: int = 4096, max_bytes: int = 2048) -> None:
        self._entries: dict[Hashable, Any] = {}
        self._seen: set[int] = set()  # hashes of the requests decoded once
        self._max_entries = max_entries
        self._max_bytes = max_bytes

    def find(self, key: Hashable, size: int) -> tuple[tuple[str, ...], Any] | None:
        """The features and value ``keep`` kept under ``key`` (a request of ``size`` bytes), or
        None: at once, without hashing ``key``, for a request too big to be kept."""
        if size > self._max_bytes:
            return None
        return self._entries.get(key)

    def keep(self, key: Hashable, size: int, features: tuple[str, ...], value: Any,
             rows: np.ndarray) -> None:
        """Keep ``value`` (decoded for ``features``; ``rows`` are its rows, made read-only)
        under ``key`` if ``key`` was decoded before, unless the request (``size`` bytes) is too
        big to keep."""
        if size > self._max_bytes:
            return
        seen = self._seen
        h = hash(key)  # (a bytes key's hash is cached: computed by ``find`` already)
        if h not in seen:
            if len(seen) >= self._max_entries:
                seen.clear()
            seen.add(h)
            return
        rows.flags.writeable = False
        entries = self._entries
        if len(entries) >= self._max_entries:
            entries.clear()
        entries[key] = (features, value)


@dataclass(slots=True)
class Job:
    """What a door decoded a request into: one model version, its rows, the outputs wanted,
    the deadline, and whatever the door's encoder needs besides the answer (``extra``)."""

    rt: ModelRunner
    rows: np.ndarray
    outputs: frozenset[Output]
    timeout_s: float
    extra: Any = None


Prepare = Callable[[Gateway, HttpRequest, dict[str, str], bytes], Job]
Encode = Callable[[Job, Answer], Reply]
Renderer = Callable[[GatewayError], Reply]


@dataclass(frozen=True, slots=True)
class Door:
    """One route: its method, its path template (``{name}`` segments), and its protocol: how
    a request is decoded (``prepare``, given the whole body; raises GatewayError), how an
    answer is encoded, how an error is rendered. A door without ``reads_body`` is given
    ``b""``."""

    method: str
    template: str
    prepare: Prepare
    encode: Encode
    render_error: Renderer
    reads_body: bool = True

    def match(self, path: str) -> dict[str, str] | None:
        """Path parameters if ``path`` fits the template, else None. A template segment
        ``{name}:verb`` matches ``<anything>:verb``."""
        parts = path.split("/")
        tparts = self.template.split("/")
        if len(parts) != len(tparts):
            return None
        params: dict[str, str] = {}
        for got, want in zip(parts, tparts, strict=True):
            if want.startswith("{"):
                name, _, suffix = want[1:].partition("}")
                if suffix:
                    if not got.endswith(suffix) or len(got) == len(suffix):
                        return None
                    got = got[:-len(suffix)]
                elif not got or ":" in got:
                    return None
                params[name] = got
            elif got != want:
                return None
        return params


Finish = Callable[[Send], Awaitable[None]]


@dataclass(slots=True)
class Waiting:
    """A request ``Doors.answer`` began that waits on the pipeline: completed alone
    (``Doors.finisher``) or in a group (``Doors.finish_many``)."""

    exchange: _Exchange
    job: Job
    pending: Pending

    @property
    def traced(self) -> bool:
        """Is the request sampled? (It is then completed alone, in its own trace context.)"""
        return self.exchange.trace is not None


class Doors:
    """The inference doors, answered as plain ASGI; see the module docstring.

    ``spaces`` maps a path prefix to the renderer of the protocol that owns the paths under it
    (``/v2``: the Open Inference Protocol), for errors of requests no door matches.
    """

    def __init__(self, doors: list[Door], *, metrics: Metrics,
                 spaces: dict[str, Renderer] | None = None) -> None:
        self._doors = doors
        self._metrics = metrics
        self._spaces = spaces or {}
        self._prefixes = tuple({"/" + d.template.split("/")[1] for d in doors})
        self._static: dict[tuple[str, str], Door] = {
            (d.method, d.template): d for d in doors if "{" not in d.template}
        self._counters: dict[tuple[str, int], Counter] = {}
        self._seconds = {d.template: metrics.request_seconds.labels(d.template) for d in doors}
        # (method, path) -> what _match found: () for no door. Paths name models, so the
        # set is small in practice; bounded all the same.
        self._matched: dict[tuple[str, str], Any] = {}

    def match(self, scope: Scope) -> tuple[Door | None, dict[str, str], list[Door]] | None:
        """The door for this request (or None with the doors of this path, which take other
        methods: 405), or None when no door has this path."""
        if scope["type"] != "http":
            return None
        path: str = scope["path"]
        door = self._static.get((scope["method"], path))
        if door is not None:
            return door, {}, []
        if not path.startswith(self._prefixes):
            return None
        key = (scope["method"], path)
        found = self._matched.get(key)
        if found is None:
            found = self._match(scope["method"], path)
            if len(self._matched) >= _MATCH_MEMO:
                self._matched.clear()
            self._matched[key] = found
        return found or None

    def _match(self, method: str, path: str
               ) -> tuple[Door | None, dict[str, str], list[Door]] | tuple[()]:
        others: list[Door] = []
        for door in self._doors:
            params = door.match(path)
            if params is None:
                continue
            if door.method == method:
                return door, params, []
            others.append(door)
        return (None, {}, others) if others else ()

    def renderer(self, scope: Scope) -> Renderer:
        """How an error of this request is rendered: by its door's protocol (the door of its
        path, whatever the method), by the protocol owning its path space, else the gateway's
        own shape (``error_reply``)."""
        found = self.match(scope) if scope["type"] == "http" else None
        if found is not None:
            door = found[0] or found[2][0]
            return door.render_error
        path: str = scope.get("path", "")
        for prefix, render in self._spaces.items():
            if path == prefix or path.startswith(prefix + "/"):
                return render
        return error_reply

    async def serve(self, found: tuple[Door | None, dict[str, str], list[Door]], scope: Scope,
                    receive: Receive, send: Send) -> None:
        """ASGI: answer a request ``match`` found a door's path for: 405 for a method no
        door of the path takes; else read its body (bounded), ``answer`` it, send the reply.
        Counted and timed."""
        door, params, others = found
        if door is None:
            await send_reply(send, self._not_allowed(others, scope))
            return
        body = b""
        if door.reads_body:
            gw: Gateway = scope["state"]["gateway"]
            try:
                body = await HttpRequest(scope, receive).body(gw.settings.max_body_bytes)
            except ClientGone:
                self._count(door.template, 499)
                return
            except GatewayError as exc:
                await send_reply(send, self._rejected(door, scope, exc))
                return
        now = self.answer([(door, params, scope, body)])[0]
        if type(now) is Reply:
            await send_reply(send, now)
        else:
            await self.finisher(now)(send)  # type: ignore[arg-type]

    def answer(self, requests: list[tuple[Door, dict[str, str], Scope, bytes]]
               ) -> list[Reply | Waiting]:
        """Run each request's door on its whole body, as far as it goes without waiting:
        per request, its reply (counted and timed) if that is all, else what it waits on
        (``finisher``, ``finish_many``). The requests are those
        that arrived together: their rows go through one ``Gateway.begin``, so the misses of
        one model share one inline call. Never raises for a request's own faults (they are
        replies); a fault of the gateway's own is logged and answered 500."""
        n = len(requests)
        out: list[Reply | Waiting | None] = [None] * n
        exchanges = [_Exchange(self, door, scope) for door, _, scope, _ in requests]
        jobs: list[Job | None] = [None] * n
        for k, (door, params, scope, body) in enumerate(requests):
            ex = exchanges[k]
            ex.enter()
            try:
                limit = ex.gw.settings.max_body_bytes
                if len(body) > limit:
                    raise BodyTooLarge(f"body of {len(body)} bytes exceeds the limit of "
                                       f"{limit} bytes")
                jobs[k] = door.prepare(ex.gw, HttpRequest(scope, None), params, body)
            except Exception as exc:  # every request gets its answer
                out[k] = ex.failed(exc)
            finally:
                ex.leave()
        todo = [k for k in range(n) if out[k] is None]
        if todo:
            gw = exchanges[todo[0]].gw
            traces = None if gw.tracing is None else [exchanges[k].traced for k in todo]
            begun: list[Answer | Pending | Exception]
            try:
                begun = list(gw.begin([(j.rt, j.rows, j.outputs)
                                       for j in (jobs[k] for k in todo) if j is not None],
                                      traces))
            except Exception as exc:
                begun = [exc] * len(todo)
            for k, result in zip(todo, begun, strict=True):
                job, ex = jobs[k], exchanges[k]
                assert job is not None
                ex.enter()
                try:
                    if isinstance(result, Exception):
                        out[k] = ex.failed(result)
                    elif isinstance(result, Answer):
                        if ex.trace is not None:
                            ex.trace.answered(len(job.rows), result.sources)
                        out[k] = ex.done(ex.door.encode(job, result))
                    else:
                        out[k] = Waiting(ex, job, result)
                except Exception as exc:
                    out[k] = ex.failed(exc)
                finally:
                    ex.leave()
        return out  # type: ignore[return-value]  # every position is filled above

    @staticmethod
    def finisher(waiting: Waiting) -> Finish:
        """The coroutine function that completes a waiting request alone and sends its reply
        through an ASGI ``send``."""
        ex, job, begun = waiting.exchange, waiting.job, waiting.pending

        async def finish(send: Send) -> None:
            ex.enter()
            reply: Reply | None = None
            try:
                try:
                    answer = await ex.gw.finish(begun, job.timeout_s)
                    if ex.trace is not None:
                        ex.trace.answered(len(job.rows), answer.sources)
                    reply = ex.done(ex.door.encode(job, answer))
                except GatewayError as exc:
                    reply = ex.failed(exc)
                await send_reply(send, reply)
            finally:
                if reply is None:  # cancelled: counted as failed
                    ex.done(None)
                ex.leave()

        return finish

    @staticmethod
    def together(waiting: list[Waiting]) -> list[list[int]]:
        """Waiting requests (of one step) in the groups ``finish_many`` completes, by
        position: those with one deadline, grouped by the pipeline (``Gateway.together``)."""
        by_timeout: dict[float, list[int]] = {}
        for n, w in enumerate(waiting):
            by_timeout.setdefault(w.job.timeout_s, []).append(n)
        groups: list[list[int]] = []
        for positions in by_timeout.values():
            gw = waiting[positions[0]].exchange.gw
            groups += [[positions[g] for g in group]
                       for group in gw.together([waiting[n].pending for n in positions])]
        return groups

    @staticmethod
    async def finish_many(waiting: list[Waiting]) -> list[Reply]:
        """Complete one group of ``together``: per request, in order, its reply, counted and
        timed (a request's own fault is its reply; a fault of the gateway's own is logged and
        answered 500). Cancelling it (shutdown) leaves every request unanswered, for
        ``shutting_down``."""
        first = waiting[0]
        alone = first.exchange if len(waiting) == 1 else None
        if alone is not None:  # what is logged meanwhile is the request's
            alone.enter()
        results: list[Answer | Exception | Failure]
        try:
            results = list(await first.exchange.gw.finish_many(
                [w.pending for w in waiting], first.job.timeout_s))
        except Exception as exc:
            results = [exc] * len(waiting)
        finally:
            if alone is not None:
                alone.leave()
        replies: list[Reply] = []
        for w, result in zip(waiting, results, strict=True):
            ex = w.exchange
            ex.enter()
            try:
                if isinstance(result, Failure):
                    replies.append(ex.failed(w.job.rt.failed(result)))
                elif isinstance(result, Exception):
                    replies.append(ex.failed(result))
                else:
                    replies.append(ex.done(ex.door.encode(w.job, result)))
            except Exception as exc:
                replies.append(ex.failed(exc))
            finally:
                ex.leave()
        return replies

    @staticmethod
    def shutting_down(waiting: Waiting) -> Reply:
        """The 503 ``shutting_down`` reply, counted, of a waiting request the shutdown gave up
        on."""
        ex = waiting.exchange
        ex.enter()
        try:
            reply = ex.failed(Unavailable("the server is shutting down and could not finish "
                                          "this request", code="shutting_down"))
        finally:
            ex.leave()
        return reply

    def _rejected(self, door: Door, scope: Scope, exc: GatewayError) -> Reply:
        """The reply to a request refused before its door ran (its body), counted."""
        exchange = _Exchange(self, door, scope)
        exchange.enter()
        try:
            return exchange.failed(exc)
        finally:
            exchange.leave()

    def _not_allowed(self, others: list[Door], scope: Scope) -> Reply:
        allowed = ", ".join(sorted({d.method for d in others}))
        reply = others[0].render_error(MethodNotAllowed(
            f"method {scope['method']} not allowed here (allowed: {allowed})"))
        reply.headers.append((b"allow", allowed.encode()))
        self._count("other", 405)
        return reply

    def _count(self, route: str, status: int) -> None:
        counter = self._counters.get((route, status))
        if counter is None:
            counter = self._counters[(route, status)] = self._metrics.requests.labels(
                route, str(status))
        self._metrics.tally.inc(counter)


class _Exchange:
    """One request at a door, from its first byte to its reply: the request id and, when
    sampled, its trace (in the context while inside, ``enter``/``leave``), the in-flight count,
    and, once ``done``, its count, latency, span and access-log line.

    The request id is the client's ``X-Request-Id``, else the trace id of a traced request,
    else a new one."""

    __slots__ = ("_doors", "_scope", "_start", "_token", "door", "finished", "gw", "rid",
                 "trace")

    def __init__(self, doors: Doors, door: Door, scope: Scope) -> None:
        self._start = time.perf_counter()
        self._doors = doors
        self.door = door
        self._scope = scope
        self.gw: Gateway = scope["state"]["gateway"]
        request = HttpRequest(scope, None)
        given = request.header(b"x-request-id")
        self.trace: RequestTrace | None = None
        tracing = self.gw.tracing
        if tracing is not None:
            parent = tracing.sample(request.header(b"traceparent"))
            if parent is not False:
                method = scope["method"]
                self.trace = tracing.request(
                    f"{method} {door.template}", parent, request.header(b"tracestate"),
                    {"http.request.method": method, "http.route": door.template})
                if given is None:
                    given = self.trace.trace_id.encode()
        self.rid = logs.request_id_from(given)
        self.finished = False
        doors._metrics.in_flight += 1
        self._token: Token[str] | None = None

    @property
    def traced(self) -> Traced | None:
        """The request's trace below the door, if it is sampled."""
        return None if self.trace is None else self.trace.traced

    def enter(self) -> None:
        self._token = logs.request_id.set(self.rid)
        if self.trace is not None:
            self.trace.enter()

    def leave(self) -> None:
        if self._token is not None:
            logs.request_id.reset(self._token)
            self._token = None
        if self.trace is not None:
            self.trace.leave()

    def failed(self, exc: BaseException) -> Reply:
        """``done`` with the protocol's error reply for ``exc``: a GatewayError is the
        request's own fault (counted by code); anything else is the gateway's (logged, 500)."""
        if not isinstance(exc, GatewayError):
            log.error("door %s failed", self.door.template, exc_info=exc)
            exc = GatewayError("internal error")
        self.gw.count_rejection(exc)
        return self.done(self.door.render_error(exc))

    def done(self, reply: Reply | None) -> Reply:
        """Count and time the request (once); ``reply`` gets its ``X-Request-Id``."""
        if reply is not None:
            reply.headers.append((b"x-request-id", self.rid.encode()))
        if self.finished:
            return reply  # type: ignore[return-value]
        self.finished = True
        doors = self._doors
        seconds = time.perf_counter() - self._start
        status = reply.status if reply is not None else 500
        route = self.door.template
        doors._count(route, status)
        metrics = doors._metrics
        metrics.tally.observe(doors._seconds[route], seconds)
        metrics.in_flight -= 1  # after counting: returning to 0 flushes the tally
        if self.trace is not None:
            self._end_span(status, reply)
        if self.gw.settings.access_log == "on":
            scope = self._scope
            logs.access(scope["method"], scope["path"], status, seconds,
                        cache=reply.cache if reply else None,
                        model=reply.model if reply else None,
                        version=reply.version if reply else None,
                        trace_id=self.trace.trace_id if self.trace is not None else None)
        return reply  # type: ignore[return-value]

    def _end_span(self, status: int, reply: Reply | None) -> None:
        assert self.trace is not None
        attributes: dict[str, str | int] = {"http.response.status_code": status}
        if reply is not None and reply.model is not None:
            attributes["gateway.model"] = reply.model
            attributes["gateway.model.version"] = reply.version or ""
            attributes["gateway.cache"] = reply.cache or ""
        self.trace.end(status >= 500, attributes)


async def send_reply(send: Send, reply: Reply) -> None:
    """Send ``reply`` through an ASGI ``send``."""
    headers = [(b"content-type", reply.content_type),
               (b"content-length", str(len(reply.body)).encode()), *reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})
