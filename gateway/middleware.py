"""ASGI middleware, written as plain ``app`` + keyword-option classes."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import logs
from gateway.metrics import Metrics

__all__ = ["MetricsMiddleware"]


class MetricsMiddleware:
    """Counts HTTP requests by route template and status, and times them; gives each an id
    (``X-Request-Id``, see ``gateway.logs``) and writes its access-log line when asked.

    Requests that match no route are labelled ``other`` so labels stay bounded.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, access_log: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self._paths: dict[object, str] = {}  # endpoint -> template, for plain Starlette routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        rid = logs.request_id_from(next(
            (v for k, v in scope["headers"] if k == b"x-request-id"), None))
        token = logs.request_id.set(rid)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"x-request-id", rid.encode())]}
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight -= 1
            seconds = time.perf_counter() - start
            template = self._template(scope)
            self.metrics.requests.labels(template, str(status)).inc()
            self.metrics.request_seconds.labels(template).observe(seconds)
            if self.access_log:
                logs.access(scope["method"], scope["path"], status, seconds)
            logs.request_id.reset(token)

    def _template(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return "other"
        if endpoint not in self._paths:
            routes = getattr(scope.get("router"), "routes", ())
            self._paths[endpoint] = next(
                (r.path for r in routes if getattr(r, "endpoint", None) is endpoint), "other"
            )
        return self._paths[endpoint]
