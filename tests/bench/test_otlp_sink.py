"""The bench's OTLP sink as a process: the SDK's own exporter sends to it, it accepts and
counts."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from bench.procs import Process, free_port

pytestmark = pytest.mark.e2e


def test_the_sdk_exporter_succeeds_against_the_sink() -> None:
    port = free_port()
    sink = Process([sys.executable, "-m", "bench.otlp_sink", "--port", str(port)],
                   stdout=subprocess.STDOUT)
    try:
        sink.wait_for("OTLP sink on")
        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces")
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("test")
        for i in range(3):
            tracer.start_span(f"span {i}").end()
        provider.shutdown()
    finally:
        sink.send(signal.SIGTERM)
        assert sink.wait() == 0
    sink.wait_for(r"^3 exports, [1-9]\d* bytes")
