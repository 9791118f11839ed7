"""Traces, in process: what a request's spans say, sent by the SDK's own exporter over OTLP/HTTP
to a real receiver that decodes them (``tests/otlp.py``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.runtime import Gateway
from gateway.tracing import parse_traceparent
from tests.otlp import Receiver, Span, otlp_receiver
from tests.support import probed_app, wait_for, wait_thread_event

pytestmark = pytest.mark.anyio

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{PARENT}-01"
ROW = {"sepal_length": "5.1", "sepal_width": "3.5", "petal_length": "1.4", "petal_width": "0.2"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as r:
        yield r


def traced(receiver: Receiver, **overrides: Any) -> dict[str, Any]:
    return {"tracing": "on", "tracing_endpoint": receiver.url, **overrides}


async def flushed(gw: Gateway) -> None:
    assert gw.tracing is not None
    assert await anyio.to_thread.run_sync(gw.tracing.flush)


def of_trace(spans: list[Span], trace_id: str) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for s in spans:
        if s.trace_id == trace_id:
            out.setdefault(s.name, []).append(s)
    return out


@pytest.mark.parametrize(("value", "parsed"), [
    (SAMPLED, (int(TRACE, 16), int(PARENT, 16), 1)),
    (f"00-{TRACE}-{PARENT}-00", (int(TRACE, 16), int(PARENT, 16), 0)),
    (f"01-{TRACE}-{PARENT}-01-future", (int(TRACE, 16), int(PARENT, 16), 1)),
    (f"00-{TRACE}-{PARENT}-01-extra", None),  # version 00 has exactly four fields
    (f"ff-{TRACE}-{PARENT}-01", None),
    (f"00-{'0' * 32}-{PARENT}-01", None),
    (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE.upper()}-{PARENT}-01", None),
    (f"00-{TRACE}-{PARENT}-1", None),
    ("00-" + "a" * 600, None),
    ("", None),
    (None, None),
])
def test_traceparent_grammar(value: str | None, parsed: tuple[int, int, int] | None) -> None:
    assert parse_traceparent(value) == parsed


async def test_a_sampled_request_continues_its_callers_trace(
        session_store: Path, receiver: Receiver) -> None:
    async with probed_app(session_store, **traced(receiver, execution="thread")) as (
            client, probe, gw):
        r = await client.get("/predict", params=ROW, headers={"traceparent": SAMPLED})
        assert r.status_code == 200
        assert r.headers["x-request-id"] == TRACE  # no X-Request-Id given: the trace id
        assert probe.calls == 1
        await flushed(gw)
    got = of_trace(receiver.spans, TRACE)
    (request,) = got["GET /predict"]
    assert request.parent_id == PARENT
    assert request.attributes["gateway.model"] == "iris"
    assert request.attributes["gateway.rows.miss"] == 1
    assert request.attributes["http.response.status_code"] == 200
    (lookup,) = got["l1 lookup"]
    (queued,) = got["batch queue"]
    assert lookup.parent_id == queued.parent_id == request.span_id
    # the model call serves a batch: a trace of its own, linked to the request
    (call,) = [s for s in receiver.spans if s.name == "model call"]
    assert call.trace_id != TRACE and call.parent_id == ""
    assert call.links == [(TRACE, request.span_id)]
    assert call.attributes["gateway.placement"] == "thread"
    assert call.attributes["gateway.rows"] == 1
    assert "@sklearn" in str(call.attributes["gateway.unit"])


async def test_an_inline_call_links_the_request_it_served(
        session_store: Path, receiver: Receiver) -> None:
    async with probed_app(session_store, **traced(receiver, execution="inline")) as (
            client, probe, gw):
        async def one(i: int) -> None:
            row = {**ROW, "sepal_length": str(4.0 + i / 10)}
            tp = f"00-{TRACE[:-2]}{i:02x}-{PARENT}-01"
            assert (await client.get("/predict", params=row,
                                     headers={"traceparent": tp})).status_code == 200

        await one(1)
        await flushed(gw)
    (call,) = receiver.named("model call")
    assert call.attributes["gateway.placement"] == "inline"
    (request,) = receiver.named("GET /predict")
    assert call.links == [(request.trace_id, request.span_id)]
    assert probe.calls == 1


async def test_unsampled_callers_and_a_zero_ratio_record_nothing(
        session_store: Path, receiver: Receiver) -> None:
    async with probed_app(session_store, **traced(receiver, tracing_sample_ratio=0.0)) as (
            client, probe, gw):
        r = await client.get("/predict", params=ROW,
                             headers={"traceparent": f"00-{TRACE}-{PARENT}-00"})
        assert r.status_code == 200 and r.headers["x-request-id"] != TRACE
        assert (await client.get("/predict", params={**ROW, "sepal_length": "6"})
                ).status_code == 200
        assert probe.calls == 2
        await flushed(gw)
    assert receiver.spans == []


async def test_a_sampled_caller_is_traced_whatever_the_ratio(
        session_store: Path, receiver: Receiver) -> None:
    async with probed_app(session_store, **traced(receiver, tracing_sample_ratio=0.0)) as (
            client, _, gw):
        r = await client.get("/predict", params=ROW,
                             headers={"traceparent": SAMPLED, "x-request-id": "mine"})
        assert r.headers["x-request-id"] == "mine"
        await flushed(gw)
    assert [s.parent_id for s in receiver.named("GET /predict")] == [PARENT]


async def test_joined_computation_and_merged_redis_lookup(
        tmp_path: Path, iris_estimator: Any, redis_server: Any, receiver: Receiver) -> None:
    from model_store import ModelStore
    from model_store.demo import IRIS_FEATURES
    root = tmp_path / "models"
    ModelStore(root).register(iris_estimator, "iris", features=IRIS_FEATURES, backend="sklearn")
    settings = traced(receiver, redis_url=redis_server.url, cache_prefix=f"trace{id(tmp_path)}",
                      l2_min_call_us=0, coalesce_remote="off", execution="thread")
    async with probed_app(root, **settings) as (client, probe, gw):
        probe.gate.clear()
        body = {"instances": [[6.1, 2.8, 4.7, 1.2]]}

        async def post(i: int) -> int:
            tp = f"00-{TRACE[:-2]}{i:02x}-{PARENT}-01"
            r = await client.post("/v1/models/iris/predict", json=body,
                                  headers={"traceparent": tp})
            return r.status_code

        first = asyncio.ensure_future(post(1))
        await wait_thread_event(probe.entered)  # the first request's model call has begun
        second = asyncio.ensure_future(post(2))
        await wait_for(lambda: gw.pipeline.waiting() == 2)  # both wait on one computation
        probe.gate.set()
        assert await first == await second == 200
        assert probe.calls == 1
        await flushed(gw)
    waits = receiver.named("singleflight wait")
    assert [w.trace_id[-2:] for w in waits] == ["02"]
    assert waits[0].attributes["gateway.rows.shared"] == 1
    mgets = receiver.named("redis MGET")
    assert mgets and all(m.parent_id == "" for m in mgets)
    linked = {t[-2:] for m in mgets for t, _ in m.links}
    assert "01" in linked
    lookups = receiver.named("redis lookup")
    assert {s.trace_id[-2:] for s in lookups} >= {"01"}


async def test_access_log_names_the_trace(
        session_store: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    async with probed_app(session_store, **traced(receiver, access_log="on")) as (client, _, _):
        with caplog.at_level("INFO", logger="gateway.access"):
            await client.get("/predict", params=ROW, headers={"traceparent": SAMPLED})
    (line,) = [r for r in caplog.records if r.name == "gateway.access"]
    assert getattr(line, "trace_id") == TRACE  # noqa: B009  # set through ``extra``
    assert f"trace_id={TRACE}" in line.getMessage()


@pytest.mark.e2e
def test_tracing_off_loads_no_tracer(session_store: Path) -> None:
    """Off, requests are answered without OpenTelemetry's tracing SDK ever being imported (so
    no span object can exist), in a fresh interpreter."""
    code = f"""
import asyncio, sys
from pathlib import Path
from tests.support import probed_app
async def main():
    async with probed_app(Path({str(session_store)!r})) as (client, _, gw):
        assert gw.tracing is None
        for i in range(20):
            r = await client.get("/predict", params={{"sepal_length": str(4 + i / 10),
                "sepal_width": "3", "petal_length": "1.4", "petal_width": "0.2"}})
            assert r.status_code == 200
asyncio.run(main())
loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk.trace",
                                                       "opentelemetry.exporter")))
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   cwd=Path(__file__).resolve().parents[2])


def test_settings_fall_back_on_the_standard_variables() -> None:
    from gateway import Settings
    from gateway.tracing import Tracing

    def opened(settings: Settings, env: dict[str, str]) -> tuple[float, str, Any]:
        """The sampling ratio, export target and service name ``Tracing.open`` settles on."""
        t = Tracing.open(settings, env)
        try:
            return t.ratio, t.target, t._provider.resource.attributes["service.name"]
        finally:
            t.shutdown()

    env = {"OTEL_TRACES_SAMPLER_ARG": "0.25", "OTEL_SERVICE_NAME": "svc",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    assert opened(Settings(tracing="on"), env) == (0.25, "OTLP grpc to http://c:4317", "svc")
    own = Settings(tracing="on", tracing_sample_ratio=0.5, tracing_service_name="gw",
                   tracing_protocol="http/protobuf",
                   tracing_endpoint="http://user:pw@h:4318/v1/traces")
    assert opened(own, env) == (
        0.5, "OTLP http/protobuf to http://user:***@h:4318/v1/traces", "gw")
    with pytest.raises(RuntimeError, match="'http/json' is not supported"):
        Tracing.open(Settings(tracing="on"), {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


async def test_spans_go_over_otlp_grpc_too(session_store: Path) -> None:
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    from tests.otlp import decode

    received: list[Span] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:  # the proto's name
            received.extend(decode(request.SerializeToString()))
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        async with probed_app(session_store, tracing="on", tracing_protocol="grpc",
                              tracing_endpoint=f"http://127.0.0.1:{port}") as (client, _, gw):
            r = await client.get("/predict", params=ROW, headers={"traceparent": SAMPLED})
            assert r.status_code == 200
            await flushed(gw)
    finally:
        server.stop(None)
    assert [s.parent_id for s in received if s.name == "GET /predict"] == [PARENT]


async def test_the_lease_script_is_the_redis_lookup_of_a_coordinated_block(
        tmp_path: Path, iris_estimator: Any, redis_server: Any, receiver: Receiver) -> None:
    """With cross-replica coordination, a sampled request's ``redis lookup`` span is the lease
    script's: its hits are what Redis held, and no ``redis MGET`` is made."""
    from model_store import ModelStore
    from model_store.demo import IRIS_FEATURES
    root = tmp_path / "models"
    ModelStore(root).register(iris_estimator, "iris", features=IRIS_FEATURES, backend="sklearn")
    settings = traced(receiver, redis_url=redis_server.url, cache_prefix=f"lease{id(tmp_path)}",
                      l2_min_call_us=0, execution="thread")
    for n in (1, 2):  # the first replica computes the row, the second finds it in Redis
        async with probed_app(root, **settings) as (client, probe, gw):
            assert gw.remote is not None
            r = await client.get("/predict", params=ROW,
                                 headers={"traceparent": f"00-{TRACE[:-2]}{n:02x}-{PARENT}-01"})
            assert r.headers["x-cache"] == ("miss" if n == 1 else "l2")
            assert probe.calls == (1 if n == 1 else 0)
            await flushed(gw)
    lookups = {s.trace_id[-2:]: s for s in receiver.named("redis lookup")}
    assert {t: s.attributes["gateway.l2.hits"] for t, s in lookups.items()} == {"01": 0, "02": 1}
    assert receiver.named("redis MGET") == []
