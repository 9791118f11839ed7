"""A real gateway with its gRPC service on, shared by the gRPC bench tests of one module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.procs import GatewayProcess, free_port, gateway_process


@dataclass(frozen=True)
class GrpcGateway:
    """The gateway process and its gRPC ``host:port``."""

    svc: GatewayProcess
    address: str


@contextmanager
def grpc_gateway(store: Path) -> Iterator[GrpcGateway]:
    """``python -m gateway`` on ``store`` (the Iris model, L1 cache only), REST and gRPC on
    free loopback ports; stopped by PID when the context ends."""
    port = free_port()
    env = {"GATEWAY_MODEL_ROOT": str(store), "GATEWAY_DEFAULT_MODEL": "iris",
           "GATEWAY_GRPC_PORT": str(port)}
    with gateway_process(env) as svc:
        yield GrpcGateway(svc, f"127.0.0.1:{port}")
