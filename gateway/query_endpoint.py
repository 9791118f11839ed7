"""``GET /predict?<feature>=<value>&…``: the hot path, served as plain ASGI.

It answers before FastAPI's routing, dependency and telemetry layers, which cost more than the
whole cached answer; it keeps the same errors, metrics and state as every other route.
"""

from __future__ import annotations

import time

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.inputs import parse_query_string
from gateway.metrics import Metrics
from gateway.runtime import Gateway

__all__ = ["QueryPredictEndpoint"]

_JSON = (b"content-type", b"application/json")
_TIMEOUT_HEADER = b"x-request-timeout-ms"


class QueryPredictEndpoint:
    """Serves ``GET path`` for the default model; passes every other request to ``app``."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, path: str = "/predict") -> None:
        self.app = app
        self.path = path
        self._requests = metrics.requests
        self._in_flight = metrics.in_flight
        self._seconds = metrics.request_seconds.labels(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        self._in_flight.inc()
        try:
            await self._answer(scope, send)
        finally:
            self._in_flight.dec()
            self._seconds.observe(time.perf_counter() - start)

    async def _answer(self, scope: Scope, send: Send) -> None:
        gw: Gateway = scope["state"]["gateway"]
        timeout_header = None
        for name, value in scope["headers"]:
            if name == _TIMEOUT_HEADER:
                timeout_header = value.decode("latin-1")
        headers: list[tuple[bytes, bytes]]
        try:
            rt = gw.runtime(gw.settings.default_model)
            row = parse_query_string(scope["query_string"], rt.manifest.features)
            values, sources = await gw.predict(rt, row, False, gw.timeout_s(timeout_header))
            status = 200
            body = orjson.dumps({"prediction": values[0]})
            headers = [_JSON, (b"x-cache", sources[0].encode())]
        except GatewayError as exc:
            gw.count_rejection(exc)
            status = exc.status
            body = orjson.dumps({"error": {"code": exc.code, "message": exc.message}})
            headers = [_JSON, *((k.lower().encode(), v.encode()) for k, v in exc.headers.items())]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._requests.labels(self.path, str(status)).inc()
