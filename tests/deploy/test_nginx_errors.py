"""Errors nginx answers itself, in the shipped configurations: JSON in the gateway's shape (the
V2 doors' own shape under /v2/), with the request id, never nginx's HTML page; on the gRPC fronts,
a gRPC status a client can act on."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procs import free_port
from bench.replicas import nginx_process, render_site
from tests.deploy.support import NGINX_DIR, free_ports, render_grpc

pytestmark = pytest.mark.e2e


def _closed_port() -> int:
    """A loopback port nothing listens on (nginx's connection is refused: 502)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("conf", ["gateway.conf", "sidecar.conf"])
def test_nginx_answers_its_own_errors_as_json(nginx: str, tmp_path: Path, conf: str) -> None:
    port = free_port()
    site = render_site(NGINX_DIR / conf, listen=f"127.0.0.1:{port}",
                       upstreams=[f"127.0.0.1:{_closed_port()}"])
    with nginx_process(site, port, tmp_path / "nginx") as ngx, \
            httpx.Client(base_url=ngx.url, timeout=30) as client:
        r = client.get("/predict", params={"x": "1"}, headers={"X-Request-Id": "r-502"})
        assert (r.status_code, r.headers["content-type"]) == (502, "application/json")
        assert r.json() == {"error": {"code": "upstream_unavailable",
                                      "message": "no gateway replica could be reached; retry"}}
        assert r.headers["x-request-id"] == "r-502"
        r = client.post("/v2/models/iris/infer", content=b"{}")
        assert (r.status_code, r.json()) == (
            502, {"error": "no gateway replica could be reached; retry"})
        big = b"0" * (2 << 20)  # past client_max_body_size (1m)
        r = client.post("/v1/models/iris/predict", content=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = client.post("/v2/models/iris/infer", content=big)
        assert r.status_code == 413 and r.json()["error"].startswith("request body larger")


@pytest.mark.parametrize("conf", ["gateway", "sidecar"])
def test_nginx_answers_its_own_grpc_errors_as_grpc_statuses(
        nginx: str, tmp_path: Path, conf: str) -> None:
    # The upstream: a port bound and never listening, held for the test, so connections to it
    # are refused and neither nginx's own ports nor another process can be it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{closed.getsockname()[1]}"
        port, grpc_port = free_ports(2)
        site = render_site(NGINX_DIR / f"{conf}.conf", listen=f"127.0.0.1:{port}",
                           upstreams=[refused])
        site += "\n" + render_grpc(NGINX_DIR / f"{conf}-grpc.conf",
                                   listen=f"127.0.0.1:{grpc_port}", upstreams=[refused])
        with nginx_process(site, port, tmp_path / "nginx"), \
                grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10,
                    metadata=[("x-request-id", "g-502")])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    assert info.value.details() == "no gateway replica could be reached; retry"
    # Trailers-Only: its headers are the trailing metadata.
    assert ("x-request-id", "g-502") in info.value.trailing_metadata()
    # nginx's own RESOURCE_EXHAUSTED (a message past client_max_body_size) is met in front of
    # live gateways only (test_nginx_grpc.py): here the refused connection comes first.
