"""``GET /predict?<feature>=<value>&…``: the hot path, served as plain ASGI.

``GatewayApp`` hands it the request before FastAPI's middleware, routing and telemetry layers,
which cost more than the whole cached answer; it keeps the same errors, metrics and state as
every other route.
"""

from __future__ import annotations

import time

import orjson
from prometheus_client import Counter
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, error_body
from gateway.inputs import parse_query_string
from gateway.metrics import Metrics
from gateway.runtime import Gateway

__all__ = ["QueryPredictEndpoint"]

_JSON = (b"content-type", b"application/json")
_TIMEOUT_HEADER = b"x-request-timeout-ms"


class QueryPredictEndpoint:
    """Answers ``GET path`` for the default model (the caller routes only that to it)."""

    def __init__(self, *, metrics: Metrics, path: str = "/predict") -> None:
        self.path = path
        self._requests = metrics.requests
        self._by_status: dict[int, Counter] = {}
        self._metrics = metrics
        self._seconds = metrics.request_seconds.labels(path)

    def handles(self, scope: Scope) -> bool:
        return bool(scope["type"] == "http" and scope["path"] == self.path
                    and scope["method"] == "GET")

    async def __call__(self, scope: Scope, _receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        self._metrics.in_flight += 1
        try:
            await self._answer(scope, send)
        finally:
            self._metrics.in_flight -= 1
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
            body = orjson.dumps(error_body(exc))
            headers = [_JSON, *((k.lower().encode(), v.encode()) for k, v in exc.headers.items())]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = self._requests.labels(self.path, str(status))
        counter.inc()
