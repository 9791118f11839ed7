"""The ASGI app: ``create_app(settings)`` builds it; the lifespan owns every long-lived object."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, InvalidInput, error_response
from gateway.inputs import parse_instances, read_json
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.middleware import MetricsMiddleware
from gateway.query_endpoint import QueryPredictEndpoint
from gateway.responses import json_response
from gateway.runtime import Gateway, gateway_of
from gateway.settings import Settings
from gateway.v2 import v2_router
from model_store import ModelStore

__all__ = ["create_app", "from_env"]

_TIMEOUT_HEADER = "x-request-timeout-ms"
_SOURCE_RANK = {"l1": 0, "l2": 1, "miss": 2}




_PREDICT_BODY_KEYS = frozenset({"instances", "version", "probabilities"})


async def predict_v1(name: str, request: Request) -> Response:
    """Predict rows with a model: `instances` as lists (features in order) or as objects keyed
    by feature name; optional `version` (default: latest) and `probabilities`.

    The answer keeps row order and says, per row, where it came from (`l1`, `l2`, `miss`).
    """
    gw = gateway_of(request)
    try:
        payload = await read_json(request, gw.settings.max_body_bytes)
        if not isinstance(payload, dict):
            raise InvalidInput("body: expected a JSON object with 'instances'",
                               code="invalid_body")
        unknown = sorted(set(payload) - _PREDICT_BODY_KEYS)
        if unknown:
            raise InvalidInput(f"body: unknown field(s) {', '.join(unknown)}",
                               code="invalid_body")
        if "instances" not in payload:
            raise InvalidInput("body: 'instances' is required", code="invalid_body")
        proba = payload.get("probabilities", False)
        if not isinstance(proba, bool):
            raise InvalidInput("probabilities: expected true or false", code="invalid_body")
        rt = gw.runtime(name, payload.get("version"))
        rows = parse_instances(payload["instances"], rt.manifest.features, gw.settings.max_rows)
        timeout_s = gw.timeout_s(request.headers.get(_TIMEOUT_HEADER))
        if proba:
            (labels, sources), (probs, proba_sources) = await asyncio.gather(
                gw.predict(rt, rows, False, timeout_s), gw.predict(rt, rows, True, timeout_s))
        else:
            labels, sources = await gw.predict(rt, rows, False, timeout_s)
        body: dict[str, Any] = {
            "model": rt.manifest.name,
            "version": str(rt.manifest.version),
            "predictions": labels,
        }
        if proba:
            body["classes"] = list(rt.manifest.classes)
            body["probabilities"] = probs
            sources = [max(a, b, key=_SOURCE_RANK.__getitem__)
                       for a, b in zip(sources, proba_sources, strict=True)]
        body["cache"] = sources
    except GatewayError as exc:
        gw.count_rejection(exc)
        return error_response(exc)
    return json_response(body)


async def list_models(request: Request) -> Response:
    """Loaded models: names, versions, features, classes."""
    return json_response({"models": gateway_of(request).describe()})


async def healthz() -> Response:
    """Liveness: the process answers."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: 200 once models are loaded (cache degradation does not fail it), else 503."""
    gw = gateway_of(request)
    ready = gw.ready
    body = {
        "status": "ready" if ready else "not_ready",
        "models": {n: sorted(vs) for n, vs in gw.models.items()},
        "cache": gw.cache_status(),
    }
    if gw.failed:
        body["failed"] = gw.failed
    return json_response(body, status=200 if ready else 503)


async def metrics(request: Request) -> Response:
    return Response(gateway_of(request).metrics.render(), media_type=CONTENT_TYPE)


async def _gateway_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return json_response({"error": {"code": code, "message": str(exc.detail)}}, exc.status_code,
                 headers=exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    where = "; ".join(
        f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors()
    )
    return json_response({"error": {"code": "invalid_input", "message": where}}, 422)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus ``GET /predict`` (served by ``QueryPredictEndpoint``)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)
        schema["paths"]["/predict"] = {"get": {
            "summary": "Predict one row of the default model from query parameters",
            "description": (
                "One query parameter per feature of the default model "
                "(`GATEWAY_DEFAULT_MODEL`), named as in its manifest; for the demo Iris model "
                "`sepal_length`, `sepal_width`, `petal_length`, `petal_width`. "
                "The `X-Cache` response header says where the answer came from."
            ),
            "parameters": [
                {"name": f, "in": "query", "required": True, "schema": {"type": "number"}}
                for f in ("sepal_length", "sepal_width", "petal_length", "petal_width")
            ],
            "responses": {
                "200": {"description": "`{\"prediction\": <label>}`"},
                "422": {"description": "missing, unknown or non-numeric parameters"},
                "503": {"description": "overloaded (see `Retry-After`) or shutting down"},
                "504": {"description": "deadline (`X-Request-Timeout-Ms`) exceeded"},
            },
        }}
        app.openapi_schema = schema
    return app.openapi_schema


class GatewayApp(FastAPI):
    """FastAPI, except that ``GET /predict`` goes straight to its plain-ASGI endpoint."""

    query_endpoint: QueryPredictEndpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.query_endpoint.handles(scope):
            await self.query_endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, *, store: ModelStore | None = None) -> FastAPI:
    """The gateway app. Nothing is loaded or connected until the lifespan starts."""
    settings = settings or Settings()
    store = store or ModelStore(settings.model_root)
    app_metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        gw = await Gateway.open(settings, store, app_metrics)
        if settings.gc_freeze:
            gc.collect()
            gc.freeze()
        try:
            yield {"gateway": gw}
        finally:
            await gw.aclose()

    app = GatewayApp(
        title="Inference gateway",
        version="0.1.0",
        description="Cached, coalesced, micro-batched predictions from versioned models.",
        lifespan=lifespan,
        middleware=[Middleware(MetricsMiddleware, metrics=app_metrics)],
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            RequestValidationError: _validation_error,
        },
    )
    app.query_endpoint = QueryPredictEndpoint(metrics=app_metrics)
    app.add_api_route(
        "/v1/models/{name}/predict", predict_v1, methods=["POST"],
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {
                "type": "object",
                "required": ["instances"],
                "properties": {
                    "instances": {"type": "array", "items": {"oneOf": [
                        {"type": "array", "items": {"type": "number"}},
                        {"type": "object", "additionalProperties": {"type": "number"}},
                    ]}},
                    "version": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
                    "probabilities": {"type": "boolean", "default": False},
                },
            },
            "example": {"instances": [[5.1, 3.5, 1.4, 0.2]], "probabilities": True},
        }}}},
    )
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.include_router(v2_router())
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def from_env() -> FastAPI:
    """Factory for ``uvicorn --factory gateway.app:from_env``: settings from the environment."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(Settings())
