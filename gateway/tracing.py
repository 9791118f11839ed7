"""OpenTelemetry traces: where a request spent its time (``GATEWAY_TRACING=on``; the package's
``tracing`` extra).

A request at a door continues the W3C trace context it carries (``traceparent``,
``tracestate``: headers, or gRPC metadata) or, without one, starts a trace when sampled
(``GATEWAY_TRACING_SAMPLE_RATIO``). A sampled request's span (the door's route, model, version,
rows, the cache tier of each row, status) has a child span per stage it went through:

* ``l1 lookup``; ``redis lookup`` (its share of a merged ``redis MGET``);
* ``singleflight wait``: waiting on another request's computation of some of its rows;
* ``lease wait``: waiting on another replica's computation (cross-replica coalescing), linked
  to that replica's ``model call`` span, whose context comes with the published value;
* ``batch queue``: its rows queued in the micro-batcher until their batch was dispatched.

An operation that serves many requests is a span of its own, linked to each sampled request it
served rather than pretending to have one parent: ``redis MGET`` (the lookups of one loop tick)
and ``model call`` (one batch or inline call: rows, backend, ``thread`` or ``inline``). Such a
span is recorded whenever one of the requests it serves is sampled.

Off (the default), the gateway holds no ``Tracing``: the context variables below stay None,
every stage's check is one ``ContextVar.get``, and no span object is created on any path.
Spans are recorded after the fact with explicit start and end times, and exported in the
background by the SDK's batch processor over OTLP (HTTP/protobuf or gRPC).
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.redact import redact_url

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanContext

    from gateway.settings import Settings

__all__ = ["Attributes", "Call", "Parent", "RequestTrace", "Traced", "Tracing", "calls", "current",
           "model_call", "parse_traceparent", "remote_context", "sink", "traceparent_of"]

Attributes = Mapping[str, str | int | float | bool]
Parent = tuple[int, int, int]  # a caller's trace id, span id and flags

current: ContextVar[Traced | None] = ContextVar("gateway_traced", default=None)
"""The sampled request this task serves (None: tracing off, or not sampled)."""

calls: ContextVar[Call | None] = ContextVar("gateway_traced_call", default=None)
"""What a model call made in this context serves (set by the batcher and the inline path)."""

sink: ContextVar[list[SpanContext] | None] = ContextVar("gateway_traced_sink", default=None)
"""Where the ``model call`` spans of this computation report their context (a lease holder's,
to publish it to the replicas waiting on its lease)."""

_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x21-\x7e]*)?")
_MAX_TRACEPARENT = 512
_MAX_TRACESTATE = 512
_SERVICE_NAME = "inference-gateway"
_TIERS = ("l1", "l2", "miss")


def parse_traceparent(value: bytes | str | None) -> Parent | None:
    """``(trace_id, parent span id, flags)`` of a W3C ``traceparent`` value, or None when it
    is absent or invalid (then the request starts a trace of its own, as the spec says)."""
    if value is None or len(value) > _MAX_TRACEPARENT:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    m = _TRACEPARENT.fullmatch(text)
    if m is None:
        return None
    version, trace_hex, span_hex, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or (rest is not None and rest == "-"):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags, 16)


@dataclass(frozen=True, slots=True)
class Traced:
    """A sampled request below its door: its span's context, and where its stages' spans go."""

    tracing: Tracing
    context: SpanContext
    span: Any = None  # the request's own span, open until its door ends it

    def note(self, attributes: Attributes) -> None:
        """Add ``attributes`` to the request's span."""
        if self.span is not None:
            self.span.set_attributes(attributes)

    def child(self, name: str, start_ns: int, attributes: Attributes | None = None,
              links: Sequence[SpanContext] = ()) -> SpanContext:
        """Record a child span of the request from ``start_ns`` to now."""
        return self.tracing.record(name, start_ns, time.time_ns(), parent=self.context,
                                   attributes=attributes, links=links)


@dataclass(slots=True)
class Call:
    """What one model call serves: the sampled requests it answers (its span links to them)
    and the lists its span's context is appended to (a lease holder's, to publish it)."""

    served: list[Traced]
    sinks: list[list[SpanContext]]

    def record(self, start_ns: int, attributes: Attributes) -> None:
        """Record the ``model call`` span (from ``start_ns`` to now), if it serves anyone."""
        if not self.served:
            return
        tracing = self.served[0].tracing
        context = tracing.record("model call", start_ns, time.time_ns(), parent=None,
                                 attributes=attributes, links=[t.context for t in self.served])
        for sink in self.sinks:
            sink.append(context)


def model_call() -> Call | None:
    """What a model call made now serves: ``calls`` (set by the batcher and the inline path),
    else the sampled request this task serves, alone (a call of its own: batching off); None
    when it serves no sampled request."""
    call = calls.get()
    if call is not None:
        return call
    trace = current.get()
    if trace is None:
        return None
    to = sink.get()
    return Call([trace], [] if to is None else [to])


class RequestTrace:
    """A request's span at its door, open until ``end``; while the door works on the request
    (``enter`` to ``leave``), its trace is ``current``."""

    __slots__ = ("_token", "trace_id", "traced")

    def __init__(self, traced: Traced) -> None:
        self.traced = traced
        self.trace_id = format(traced.context.trace_id, "032x")
        self._token: Token[Traced | None] | None = None

    def enter(self) -> None:
        self._token = current.set(self.traced)

    def leave(self) -> None:
        if self._token is not None:
            current.reset(self._token)
            self._token = None

    def answered(self, rows: int, sources: Sequence[str]) -> None:
        """Note the answer's rows and the tier each came from (``l1``, ``l2``, ``miss``)."""
        self.traced.note({"gateway.rows": rows, **{
            f"gateway.rows.{tier}": sources.count(tier) for tier in _TIERS}})

    def end(self, error: bool, attributes: Attributes) -> None:
        """End the span with what the door knows of the answer; ``error``: a failure of the
        server's (HTTP 5xx; gRPC UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED...)."""
        span = self.traced.span
        span.set_attributes(attributes)
        if error:
            from opentelemetry.trace import Status, StatusCode
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class Tracing:
    """Spans of one gateway process, exported over OTLP; see the module docstring. Build with
    ``Tracing.open(settings)``, end with ``shutdown()`` (which exports what is left)."""

    def __init__(self, provider: TracerProvider, ratio: float, target: str = "") -> None:
        """``ratio``: share of requests without a caller's decision that start a trace;
        ``target``: where spans go, for the log."""
        from opentelemetry.context import Context
        from opentelemetry.trace import Link, NonRecordingSpan, SpanKind, set_span_in_context

        self._provider = provider
        self._tracer = provider.get_tracer("gateway")
        self.ratio = ratio
        self.target = target
        self._empty = Context()
        self._link = Link
        self._non_recording = NonRecordingSpan
        self._set_span = set_span_in_context
        self._server = SpanKind.SERVER
        self._internal = SpanKind.INTERNAL

    @classmethod
    def open(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> Tracing:
        """The process's tracer provider and exporter, from ``settings`` and the standard
        ``OTEL_*`` variables of ``environ`` (default ``os.environ``) where a ``GATEWAY_TRACING_*``
        setting is unset. Raises RuntimeError when the ``tracing`` extra is not installed."""
        env = os.environ if environ is None else environ
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise RuntimeError("GATEWAY_TRACING=on needs the tracing extra: pip install "
                               "'inference-gateway[tracing]'") from exc
        ratio = settings.tracing_sample_ratio
        if ratio is None:
            ratio = _ratio(env.get("OTEL_TRACES_SAMPLER_ARG"))
        service = settings.tracing_service_name or env.get("OTEL_SERVICE_NAME") or _SERVICE_NAME
        protocol = (settings.tracing_protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
        exporter = _exporter(protocol, settings.tracing_endpoint)
        provider = TracerProvider(resource=Resource.create({"service.name": service}),
                                  sampler=_sampler())
        provider.add_span_processor(BatchSpanProcessor(exporter))
        endpoint = (settings.tracing_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "the default endpoint")
        return cls(provider, ratio, f"OTLP {protocol} to {redact_url(endpoint)}")

    def _in_context(self, parent: SpanContext) -> Any:
        return self._set_span(self._non_recording(parent), self._empty)

    def sample(self, traceparent: bytes | str | None) -> Parent | bool:
        """Is a request with this ``traceparent`` header (or None) traced? Its valid parent's
        decision (the parent, or False), else the ratio's (True or False)."""
        parent = parse_traceparent(traceparent)
        if parent is None:
            return self.ratio >= 1.0 or random.random() < self.ratio
        return parent if parent[2] & 1 else False

    def request(self, name: str, parent: Parent | bool, tracestate: bytes | str | None,
                attributes: Attributes) -> RequestTrace:
        """Start the span of a request ``sample`` traced (``parent``: what it returned),
        continuing the caller's trace or starting one."""
        if isinstance(parent, tuple):
            context = self._in_context(_remote(parent, tracestate))
        else:
            context = self._empty
        span = self._tracer.start_span(name, context, self._server, attributes)
        return RequestTrace(Traced(self, span.get_span_context(), span))

    def record(self, name: str, start_ns: int, end_ns: int, *, parent: SpanContext | None,
               attributes: Attributes | None = None, links: Sequence[SpanContext] = ()
               ) -> SpanContext:
        """Record a finished span: a child of ``parent``, or (None) the root of a trace of its
        own, linked to ``links``. Returns its context."""
        context = self._empty if parent is None else self._in_context(parent)
        span = self._tracer.start_span(name, context, self._internal, attributes,
                                       [self._link(sc) for sc in links], start_time=start_ns)
        span.end(end_time=end_ns)
        return span.get_span_context()

    def flush(self) -> bool:
        """Export every span recorded so far (blocks up to the exporter's timeout); False when
        that did not succeed in time."""
        return bool(self._provider.force_flush())

    def shutdown(self) -> None:
        """Export the spans still queued, then stop (blocks up to the exporter's timeout)."""
        self._provider.shutdown()


def traceparent_of(context: SpanContext) -> str:
    """The W3C ``traceparent`` of ``context``."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _remote(parent: Parent, tracestate: bytes | str | None) -> SpanContext:
    from opentelemetry.trace import SpanContext, TraceFlags, TraceState

    state = None
    if tracestate is not None and 0 < len(tracestate) <= _MAX_TRACESTATE:
        text = tracestate.decode("latin-1") if isinstance(tracestate, bytes) else tracestate
        state = TraceState.from_header([text])
    return SpanContext(parent[0], parent[1], is_remote=True, trace_flags=TraceFlags(parent[2]),
                       trace_state=state)


def remote_context(traceparent: bytes | str) -> SpanContext | None:
    """The span context a ``traceparent`` names (another replica's span), or None."""
    parent = parse_traceparent(traceparent)
    return None if parent is None else _remote(parent, None)


def _ratio(text: str | None) -> float:
    if not text:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        return 1.0
    return value if 0.0 <= value <= 1.0 else 1.0


def _sampler() -> Any:
    """The SDK's sampling, after the gateway's own decision for a request without a parent:
    a span with a parent follows it; a root span (a request the gateway sampled, or an
    operation linked to sampled requests) is recorded."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    return ParentBased(root=ALWAYS_ON)


def _exporter(protocol: str, endpoint: str | None) -> Any:
    """The OTLP span exporter over ``protocol`` (``http/protobuf`` or ``grpc``) to
    ``endpoint``, or (None) where the standard variables say (the exporter reads them, with
    headers, timeout and compression)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )
        return GrpcExporter(endpoint=endpoint)
    if protocol != "http/protobuf":
        raise RuntimeError(f"OTLP protocol {protocol!r} is not supported (http/protobuf, grpc)")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )
    return HttpExporter(endpoint=endpoint)
