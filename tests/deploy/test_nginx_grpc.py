"""The shipped gRPC fronts in front of real gateway processes serving the Open Inference Protocol
over gRPC (``GATEWAY_GRPC_PORT``), called by the stock ``tritonclient.grpc`` client.

nginx runs ``deploy/nginx/gateway.conf`` with ``gateway-grpc.conf`` (two replicas), or
``sidecar.conf`` with ``sidecar-grpc.conf`` (one gateway: REST on a unix socket, gRPC on
loopback), with only listen addresses and upstream servers replaced.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.procs import GatewayProcess, free_port, gateway_process, gateways
from bench.replicas import Nginx, nginx_process, render_site
from model_store.demo import IRIS_FEATURES
from tests.deploy.support import NGINX_DIR, free_ports, metric_sum, render_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_GRPC_LISTENING = re.compile(r"gRPC \(Open Inference Protocol\) on 127\.0\.0\.1:(\d+)")


def grpc_address(gw: GatewayProcess) -> str:
    """The loopback address the gateway logged for its gRPC service, once it has."""
    (m,) = gw.process.wait_for(_GRPC_LISTENING)
    return f"127.0.0.1:{m.group(1)}"


@dataclass
class GrpcFront:
    nginx: Nginx
    address: str  # nginx's gRPC listener, host:port
    gateways: list[GatewayProcess]


@contextmanager
def grpc_front(conf: str, grpc_conf: str, gws: list[GatewayProcess], directory: Path,
               grpc_upstreams: list[str]) -> Iterator[GrpcFront]:
    """nginx with the REST front ``conf`` and the gRPC front ``grpc_conf`` in one http context."""
    port, grpc_port = free_ports(2)
    site = render_site(NGINX_DIR / conf, listen=f"127.0.0.1:{port}",
                       upstreams=[g.upstream for g in gws])
    site += "\n" + render_grpc(NGINX_DIR / grpc_conf, listen=f"127.0.0.1:{grpc_port}",
                               upstreams=grpc_upstreams)
    with nginx_process(site, port, directory) as ngx:
        yield GrpcFront(ngx, f"127.0.0.1:{grpc_port}", gws)


@pytest.fixture(scope="module")
def front(nginx: str, session_store: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcFront]:
    env = {"GATEWAY_MODEL_ROOT": str(session_store), "GATEWAY_GRPC_PORT": "0"}
    with gateways(2, env) as gws, \
            grpc_front("gateway.conf", "gateway-grpc.conf", gws, tmp_path_factory.mktemp("nginx"),
                       [grpc_address(g) for g in gws]) as f:
        yield f


def infer_calls(gw: GatewayProcess) -> float:
    return metric_sum(gw.metrics(), "gateway_grpc_requests_total", method="ModelInfer", code="OK")


def test_stock_tritonclient_through_nginx_gets_the_150_rows_from_both_replicas(
        front: GrpcFront, iris_estimator: Any, iris_rows: np.ndarray) -> None:
    want_labels = iris_estimator.predict(iris_rows).tolist()
    want_probas = iris_estimator.predict_proba(iris_rows)
    before = [infer_calls(g) for g in front.gateways]
    client = tc.InferenceServerClient(front.address)
    failures = 0
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("iris")
        assert client.get_model_metadata("iris", as_json=True)["versions"] == ["1"]
        for i, row in enumerate(iris_rows):  # raw contents, one row a call, as tritonclient sends
            inp = tc.InferInput("input", [1, 4], "FP64")
            inp.set_data_from_numpy(row.reshape(1, 4))
            result = client.infer("iris", [inp])
            failures += result.as_numpy("label")[0].decode() != want_labels[i]
            failures += not np.allclose(result.as_numpy("probabilities")[0], want_probas[i],
                                        rtol=1e-12, atol=0)
    finally:
        client.close()
    assert failures == 0
    # Typed contents, all rows in one call, through tritonclient's own stub and messages.
    with grpc.insecure_channel(front.address) as channel:
        req = service_pb2.ModelInferRequest(model_name="iris", id="all")
        t = req.inputs.add(name="input", datatype="FP64", shape=list(iris_rows.shape))
        t.contents.fp64_contents.extend(iris_rows.ravel().tolist())
        got = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30)
    assert got.id == "all"
    assert [b.decode() for b in got.outputs[0].contents.bytes_contents] == want_labels
    assert np.allclose(np.reshape(got.outputs[1].contents.fp64_contents, want_probas.shape),
                       want_probas, rtol=1e-12, atol=0)

    served = [infer_calls(g) - b for g, b in zip(front.gateways, before, strict=True)]
    assert sum(served) == 151 and min(served) > 0, served  # nginx spreads calls over replicas

    with httpx.Client(base_url=front.nginx.url, timeout=30) as rest:  # REST beside it, unchanged
        params = dict(zip(IRIS_FEATURES, map(float, iris_rows[0]), strict=True))
        assert rest.get("/predict", params=params).json() == {"prediction": want_labels[0]}


def test_the_health_service_and_request_ids_through_nginx(front: GrpcFront) -> None:
    with grpc.insecure_channel(front.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        reply, call = check.with_call(health_pb2.HealthCheckRequest(service=""), timeout=10,
                                      metadata=[("x-request-id", "probe-7")])
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert ("x-request-id", "probe-7") in call.trailing_metadata()
        # An id nginx does not pass on is replaced by its own, as for REST.
        _, call = check.with_call(health_pb2.HealthCheckRequest(), timeout=10,
                                  metadata=[("x-request-id", "has space")])
        ids = [v for k, v in call.trailing_metadata() if k == "x-request-id"]
        assert len(ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", ids[0]), ids
    calls = sum(metric_sum(g.metrics(), "gateway_grpc_requests_total", method="Health.Check",
                           code="OK") for g in front.gateways)
    assert calls >= 2


def test_the_sidecar_front_for_grpc(nginx: str, session_store: Path, tmp_path: Path,
                                    iris_estimator: Any, iris_rows: np.ndarray) -> None:
    sock = tmp_path / "gateway.sock"
    grpc_port = free_port()
    env = {"GATEWAY_MODEL_ROOT": str(session_store), "GATEWAY_GRPC_PORT": str(grpc_port),
           "GATEWAY_GRPC_HOST": "127.0.0.1"}
    with gateway_process(env, uds=sock) as gw, \
            grpc_front("sidecar.conf", "sidecar-grpc.conf", [gw], tmp_path / "nginx",
                       [grpc_address(gw)]) as f:
        client = tc.InferenceServerClient(f.address)
        try:
            inp = tc.InferInput("input", list(iris_rows.shape), "FP64")
            inp.set_data_from_numpy(iris_rows)
            labels = client.infer("iris", [inp]).as_numpy("label")
            assert [b.decode() for b in labels] == iris_estimator.predict(iris_rows).tolist()
        finally:
            client.close()
        with grpc.insecure_channel(f.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with httpx.Client(transport=httpx.HTTPTransport(), base_url=f.nginx.url) as rest:
            assert rest.get("/readyz", timeout=10).json()["status"] == "ready"


def test_message_size_limits_through_nginx(front: GrpcFront) -> None:
    """A message the gateway's limit (GATEWAY_MAX_BODY_BYTES, 1 MiB) admits passes nginx; a
    larger one is RESOURCE_EXHAUSTED, whether the gateway or nginx (past its own, slightly
    larger, client_max_body_size) refuses it."""
    limit = 1 << 20

    def code(payload: int) -> tuple[grpc.StatusCode, str]:
        request = service_pb2.ModelInferRequest(model_name="iris")
        request.inputs.add(name="input", datatype="FP64", shape=[1, 4])
        request.raw_input_contents.append(b"\0" * payload)
        with grpc.insecure_channel(front.address) as channel:
            try:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
        return grpc.StatusCode.OK, ""

    assert code(limit - 64)[0] == grpc.StatusCode.INVALID_ARGUMENT  # the gateway read it
    gateways_own, nginxs = code(limit + 16), code(4 * limit)
    proxy = "request message larger than the proxy accepts (client_max_body_size)"
    assert gateways_own[0] == nginxs[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    gateway = f"more than the {limit} taken"
    assert gateway in gateways_own[1]  # under nginx's limit: the gateway refuses it
    assert gateway in nginxs[1] or nginxs[1] == proxy  # the first to see the size refuses it
