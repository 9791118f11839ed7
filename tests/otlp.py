"""An OTLP/HTTP trace receiver for tests: a real HTTP server on a free port that decodes what
the gateway exports (``ExportTraceServiceRequest``, protobuf, optionally gzip) with the
protocol's own message definitions (``opentelemetry-proto``) and keeps the spans."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

PATH = "/v1/traces"


@dataclass(frozen=True)
class Span:
    """One received span, ids as lower-case hex."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    links: list[tuple[str, str]]  # (trace id, span id)
    attributes: dict[str, Any]
    start_ns: int
    end_ns: int


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


def decode(body: bytes) -> list[Span]:
    """The spans of one ``ExportTraceServiceRequest``."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for rs in request.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(
                    service=str(resource.get("service.name", "")), name=s.name,
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(),
                    links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                    attributes={a.key: _value(a.value) for a in s.attributes},
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano))
    return out


@dataclass
class Receiver:
    """The spans received so far; ``url`` is the endpoint to export to."""

    url: str
    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def add(self, spans: list[Span]) -> None:
        with self._changed:
            self.spans.extend(spans)
            self.requests += 1
            self._changed.notify_all()

    def wait_for(self, found: Callable[[list[Span]], Any], timeout_s: float = 30.0) -> Any:
        """The first truthy ``found(spans)`` as spans arrive; AssertionError after
        ``timeout_s`` without one."""
        with self._changed:
            result = self._changed.wait_for(lambda: found(list(self.spans)), timeout_s)
        if not result:
            names = sorted({(s.service, s.name) for s in self.spans})
            raise AssertionError(f"spans not received within {timeout_s} s; got {names}")
        return result

    def named(self, name: str) -> list[Span]:
        with self._changed:
            return [s for s in self.spans if s.name == name]


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    """A receiver on 127.0.0.1, answering every export with an empty success response."""
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != PATH:
                self.send_response(404)
                self.end_headers()
                return
            holder[0].add(decode(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(Receiver(f"http://127.0.0.1:{server.server_address[1]}{PATH}"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
