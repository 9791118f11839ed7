"""The ASGI app: ``create_app(settings)`` builds it; the lifespan owns every long-lived object."""

from __future__ import annotations

import asyncio
import gc
import importlib.resources
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from gateway import logs
from gateway.core.runner import SwitchInterval
from gateway.errors import GatewayError, HttpError, InvalidInput, error_response
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.middleware import MetricsMiddleware
from gateway.protocols import query, v1, v2
from gateway.protocols.http import Doors, as_response
from gateway.responses import json_response
from gateway.runtime import Gateway, gateway_of
from gateway.settings import Settings
from model_store import Manifest, ModelStore, ModelStoreError

__all__ = ["create_app", "from_env"]


async def list_models(request: Request) -> Response:
    """Loaded models: names, versions, features, classes."""
    return json_response({"models": gateway_of(request).describe()})


async def model_status(name: str, request: Request) -> Response:
    """KServe V1 model status: ``{"name", "ready"}`` (404 for an unknown model)."""
    gw = gateway_of(request)
    try:
        gw.runtime(name)
    except GatewayError as exc:
        return error_response(exc)
    return json_response({"name": name, "ready": gw.accepting})


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
        "redis": {n: {str(v): gw.redis_use(rt) for v, rt in sorted(vs.items())}
                  for n, vs in gw.models.items()},
    }
    if gw.failed:
        body["failed"] = gw.failed
    return json_response(body, status=200 if ready else 503)


async def metrics(request: Request) -> Response:
    return Response(gateway_of(request).metrics.render(), media_type=CONTENT_TYPE)


async def _gateway_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


def _rendered(request: Request, exc: GatewayError) -> Response:
    """``exc`` rendered the way of the protocol whose path this is (``Doors.renderer``)."""
    app: GatewayApp = request.app
    return as_response(app.doors.renderer(request.scope)(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _rendered(request, HttpError(exc.status_code, str(exc.detail), exc.headers))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    where = "; ".join(
        f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors()
    )
    return _rendered(request, InvalidInput(where))


_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}}}},
}


_V2_ERROR_SCHEMA = {"type": "object", "required": ["error"],
                    "properties": {"error": {"type": "string"}}}


def _real_errors(op: dict[str, Any], *, v2: bool) -> None:
    """Document FastAPI's routes with the errors the gateway really answers."""
    responses = op.setdefault("responses", {})
    error = {"application/json": {"schema": _V2_ERROR_SCHEMA if v2 else _ERROR_SCHEMA}}
    if "422" in responses and "HTTPValidationError" in str(responses["422"]):
        del responses["422"]
        responses["400" if v2 else "422"] = {"description": "invalid path parameter",
                                             "content": error}
    if "{name}" in str(op.get("parameters", "")) and "404" not in responses:
        responses["404"] = {"description": "unknown model or version", "content": error}


def _default_manifest(store: ModelStore, name: str) -> Manifest | None:
    try:
        return store.manifest(name, store.latest(name))
    except (ModelStoreError, OSError, ValueError):
        return None


def _openapi(app: GatewayApp, store: ModelStore, settings: Settings) -> dict[str, Any]:
    """FastAPI's schema plus the doors answered ahead of it."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)
        paths = schema["paths"]
        paths["/predict"] = query.openapi_path(
            _default_manifest(store, settings.default_model), _ERROR_SCHEMA)
        paths.update(v1.openapi_paths(_ERROR_SCHEMA))
        paths.update(v2.openapi_paths())
        v2_paths = set(v2.openapi_paths()) | {getattr(route, "path", "")
                                              for route in v2.v2_router().routes}
        for path, item in paths.items():
            for op in item.values():
                _real_errors(op, v2=path in v2_paths)
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        if "components" in schema and not schemas:
            del schema["components"]
        app.openapi_schema = schema
    return app.openapi_schema


_ASSETS = "/docs/assets"


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs`` and ReDoc at ``/redoc``, from a packaged copy of their assets:
    the pages work without internet access and name no external host."""
    assets = importlib.resources.files("fastapi_offline") / "static"
    app.mount(_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")
    favicon = f"{_ASSETS}/favicon.png"

    async def swagger() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{app.title} - docs",
            swagger_js_url=f"{_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{_ASSETS}/swagger-ui.css", swagger_favicon_url=favicon)

    async def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=favicon, with_google_fonts=False)

    app.add_api_route("/docs", swagger, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)


async def _start_grpc(gw: Gateway, settings: Settings, metrics: Metrics) -> Any:
    """The gRPC service (``gateway.protocols.grpc_v2``, imported only when it is on), started
    in this event loop, with the connection cap of the HTTP server."""
    from gateway.protocols.grpc_v2 import GrpcServer
    from gateway.server import default_connection_limit

    assert settings.grpc_port is not None
    server = GrpcServer(gw, metrics, host=settings.grpc_host, port=settings.grpc_port,
                        max_connections=settings.limit_concurrency or default_connection_limit())
    await server.start()
    return server


class GatewayApp(FastAPI):
    """FastAPI, except that the inference doors are answered ahead of it (see
    ``gateway.protocols.http``)."""

    doors: Doors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.doors.match(scope)
        if found is None:
            await super().__call__(scope, receive, send)
        else:
            await self.doors.serve(found, scope, receive, send)


def create_app(settings: Settings | None = None, *, store: ModelStore | None = None) -> FastAPI:
    """The gateway app. Nothing is loaded or connected until the lifespan starts."""
    settings = settings or Settings()
    store = store or ModelStore(settings.model_root)
    app_metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        unwatch_gc = app_metrics.watch_gc()
        gw = await Gateway.open(settings, store, app_metrics)
        SwitchInterval.prefer_models(settings.switch_interval_us / 1e6)
        if settings.gc_freeze:
            gc.collect()
            gc.freeze()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, gw.registry.reload_soon)
            hup = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            hup = False
        state: dict[str, Any] = {"gateway": gw}
        try:
            if settings.grpc_port is not None:
                state["grpc"] = await _start_grpc(gw, settings, app_metrics)
            yield state
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            if "grpc" in state:  # after the drain: calls still running get the grace period
                await state["grpc"].stop(settings.shutdown_grace_s)
            await gw.aclose()
            unwatch_gc()
            SwitchInterval.prefer_models(None)

    app = GatewayApp(
        docs_url=None,
        redoc_url=None,
        title="Inference gateway",
        version="0.1.0",
        description="Cached, coalesced, micro-batched predictions from versioned models.",
        lifespan=lifespan,
        middleware=[Middleware(MetricsMiddleware, metrics=app_metrics,
                               access_log=settings.access_log == "on")],
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            RequestValidationError: _validation_error,
        },
    )
    app.doors = Doors([query.door(), *v1.doors(), *v2.doors()], metrics=app_metrics,
                      spaces={v2.PREFIX: v2.render_error})
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{name}", model_status, methods=["GET"])
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.include_router(v2.v2_router())
    _add_docs(app)
    app.openapi = lambda: _openapi(app, store, settings)  # type: ignore[method-assign]
    return app


def from_env() -> FastAPI:
    """Factory for ``uvicorn --factory gateway.app:from_env``: settings from the environment,
    logging set up as they say."""
    settings = Settings()
    logs.configure(settings.log_format, logging.getLevelName(
        logging.getLogger("uvicorn.error").getEffectiveLevel()))
    return create_app(settings)
