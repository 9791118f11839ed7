"""Traces across real processes: nginx (the shipped config) in front of two gateway replicas
sharing a redis-server, exporting over OTLP/HTTP to a receiver of the test's own that decodes
the protobuf with the protocol's message definitions (``tests/otlp.py``); and a gRPC call."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from bench.procs import RedisServer, free_port, gateway_process
from bench.replicas import nginx_process, render_site
from gateway.protocols.proto import grpc_service_pb2 as pb
from gateway.protocols.proto import grpc_service_pb2_grpc as service_pb2_grpc
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES
from tests.deploy.support import NGINX_DIR
from tests.gateway.remote_support import NOTIFY_ENV, SLEEP_ENV, Sleepy, fire, predict_request
from tests.otlp import Receiver, Span, otlp_receiver

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PARENT = "00f067aa0ba902b7"
CALL_S = 0.5


def tp(n: int) -> str:
    return f"00-{n:032x}-{PARENT}-01"


def traced_env(receiver: Receiver, service: str, **extra: str) -> dict[str, str]:
    return {"GATEWAY_TRACING": "on", "GATEWAY_TRACING_ENDPOINT": receiver.url,
            "GATEWAY_TRACING_SERVICE_NAME": service, "GATEWAY_MODEL_POLL_S": "0",
            "OTEL_BSP_SCHEDULE_DELAY": "50", **extra}


def with_header(request: tuple[int, bytes], name: str, value: str) -> tuple[int, bytes]:
    port, raw = request
    head, _, body = raw.partition(b"\r\n\r\n")
    return port, head + f"\r\n{name}: {value}".encode() + b"\r\n\r\n" + body


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as r:
        yield r


def test_a_lease_wait_behind_nginx_links_the_other_replicas_model_call(
        tmp_path: Path, iris_estimator: Any, redis_server: RedisServer, random_rows: np.ndarray,
        receiver: Receiver) -> None:
    root = tmp_path / "models"
    ModelStore(root).register(Sleepy(iris_estimator), "iris", features=IRIS_FEATURES,
                              backend="sklearn")
    sock = str(tmp_path / "calls.sock")
    common = {"GATEWAY_MODEL_ROOT": str(root), "GATEWAY_REDIS_URL": redis_server.url,
              "GATEWAY_CACHE_PREFIX": f"trace{tmp_path.name}", "GATEWAY_L2_MIN_CALL_US": "0",
              "GATEWAY_REMOTE_LEASE_MIN_MS": "5000", "GATEWAY_REDIS_TIMEOUT_MS": "500",
              SLEEP_ENV: str(CALL_S), NOTIFY_ENV: sock}
    row = random_rows[977].tolist()
    expected = iris_estimator.predict(random_rows[977:978]).tolist()[0]
    with (gateway_process(traced_env(receiver, "replica-a", **common)) as a,
          gateway_process(traced_env(receiver, "replica-b", **common)) as b):
        port = free_port()
        site = render_site(NGINX_DIR / "gateway.conf", listen=f"127.0.0.1:{port}",
                           upstreams=[a.upstream, b.upstream])
        with nginx_process(site, port, tmp_path / "nginx") as ngx:

            async def run() -> list[Any]:
                called: asyncio.Queue[int] = asyncio.Queue()

                async def on_call(reader: asyncio.StreamReader,
                                  writer: asyncio.StreamWriter) -> None:
                    called.put_nowait(int(await reader.readline()))
                    writer.close()

                server = await asyncio.start_unix_server(on_call, sock)
                async with server:
                    # replica A takes the lease and computes (its model call takes CALL_S)
                    first = asyncio.ensure_future(fire([with_header(
                        predict_request(a.port, row), "traceparent", tp(1))]))
                    assert await asyncio.wait_for(called.get(), 30) == a.proc.pid
                    # meanwhile, the same row through nginx: the requests nginx sends to B
                    # wait on A's lease
                    behind = await fire([with_header(predict_request(port, row), "traceparent",
                                                     tp(n)) for n in range(2, 6)])
                    return [*await first, *behind]

            replies = asyncio.run(run())
            assert [(r.status, r.prediction()) for r in replies] == [(200, expected)] * 5

            def found(spans: list[Span]) -> Any:
                calls = {s.span_id: s for s in spans
                         if s.name == "model call" and s.service == "replica-a"}
                for wait in (s for s in spans if s.name == "lease wait"
                             and s.service == "replica-b"):
                    requests = [s for s in spans if s.span_id == wait.parent_id]
                    linked = [calls[sid] for _, sid in wait.links if sid in calls]
                    if requests and linked:
                        return wait, requests[0], linked[0]
                return None

            wait, request, call = receiver.wait_for(found)
            logged = ngx.access_lines(4)  # nginx logs the traceparent it passed on
            assert {f"traceparent={tp(n)}" for n in range(2, 6)} <= {
                field for line in logged for field in line.split(" ")}
    # the request span continues the caller's trace, as nginx passed it on
    assert request.parent_id == PARENT
    assert request.trace_id in {f"{n:032x}" for n in range(2, 6)}
    assert request.name == "POST /v1/models/{name}/predict"
    assert wait.attributes["gateway.rows.announced"] == 1
    # A's model call served A's own request: linked to it, in a trace of its own
    (a_request,) = [s for s in receiver.spans if s.trace_id == f"{1:032x}"
                    and s.name.startswith("POST")]
    assert (a_request.trace_id, a_request.span_id) in call.links
    assert call.trace_id not in {request.trace_id, a_request.trace_id}


def test_a_grpc_call_continues_the_trace_in_its_metadata(
        session_store: Path, receiver: Receiver) -> None:
    port = free_port()
    env = traced_env(receiver, "grpc", GATEWAY_MODEL_ROOT=str(session_store),
                     GATEWAY_GRPC_PORT=str(port), GATEWAY_ACCESS_LOG="on")
    with gateway_process(env) as gw:
        gw.process.wait_for(rf"gRPC \(Open Inference Protocol\) on 127\.0\.0\.1:{port}")
        x = np.array([[5.9, 3.0, 5.1, 1.8]])
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP64",
                                                       shape=[1, 4])
        request = pb.ModelInferRequest(model_name="iris", inputs=[tensor],
                                       raw_input_contents=[x.tobytes()])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            _, call = stub.ModelInfer.with_call(request, metadata=[("traceparent", tp(7))])
            trailing = dict(call.trailing_metadata())
        assert trailing["x-request-id"] == f"{7:032x}"
        spans = receiver.wait_for(lambda s: [x for x in s if x.trace_id == f"{7:032x}"
                                             and x.name.endswith("ModelInfer")])
        gw.process.wait_for(f"trace_id={7:032x}")
    (span,) = spans
    assert span.parent_id == PARENT
    assert span.attributes["rpc.grpc.status_code"] == 0
    assert span.attributes["gateway.model"] == "iris"
    assert span.attributes["gateway.rows"] == 1
