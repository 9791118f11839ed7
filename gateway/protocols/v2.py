"""Open Inference Protocol (KServe V2) REST under ``/v2``.

``infer`` is a door of its own (answered ahead of FastAPI, see ``gateway.protocols.http``);
health and metadata are ordinary routes. Every row of an infer request goes through the same
pipeline as the other doors. Errors are ``{"error": "<message>"}``: 400 for a bad request, 404
for an unknown model or version, 413 for an oversized body, 503 when not ready or overloaded,
504 past the deadline.
"""

from __future__ import annotations

import hmac
from typing import Any
from weakref import WeakKeyDictionary

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.core.pipeline import Answer
from gateway.core.runner import ModelRunner, Output
from gateway.errors import Forbidden, GatewayError, InvalidInput, Unauthorized
from gateway.protocols.http import (
    Decoded,
    Door,
    Encode,
    HttpRequest,
    Job,
    Prepare,
    Reply,
    as_response,
    timeout_s,
)
from gateway.protocols.v2_codec import (
    OutputSpec,
    decode_infer_request,
    encode_infer_response,
)
from gateway.responses import json_response
from gateway.runtime import Gateway, gateway_of

__all__ = ["PREFIX", "doors", "label_datatype", "openapi_paths", "outputs_of", "render_error",
           "v2_router"]

PREFIX = "/v2"  # the paths this protocol owns

SERVER_NAME = "inference-gateway"
SERVER_VERSION = "0.1.0"
_V2_STATUS = {422: 400, 400: 400}  # our validation errors are the protocol's bad requests
_OUTPUT_OF: dict[str, Output] = {"label": "label", "prediction": "label",
                                 "probabilities": "probabilities"}


def render_error(exc: GatewayError) -> Reply:
    """The protocol's error answer: ``{"error": "<message>"}``."""
    return Reply(_V2_STATUS.get(exc.status, exc.status), orjson.dumps({"error": exc.message}),
                 [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()])


def _error(gw: Gateway, exc: GatewayError) -> Response:
    gw.count_rejection(exc)
    return as_response(render_error(exc))


def label_datatype(rt: ModelRunner) -> str:
    """BYTES for string classes, INT64 for integer ones, FP64 for regression values."""
    m = rt.manifest
    if m.task == "regression":
        return "FP64"
    if m.classes and all(type(c) is int for c in m.classes):
        return "INT64"
    if m.classes and all(type(c) in (int, float) for c in m.classes):
        return "FP64"
    return "BYTES"


def outputs_of(rt: ModelRunner) -> list[tuple[str, str, list[int]]]:
    """A version's outputs: (name, datatype, shape) each."""
    m = rt.manifest
    if m.task == "regression":
        return [("prediction", "FP64", [-1])]
    out = [("label", label_datatype(rt), [-1])]
    if rt.has_proba:
        out.append(("probabilities", "FP64", [-1, len(m.classes)]))
    return out


_Outputs = dict[str, tuple[str, list[int]]]
_DESCRIBED: WeakKeyDictionary[ModelRunner, tuple[_Outputs, dict[bool, tuple[OutputSpec, ...]]]]
_DESCRIBED = WeakKeyDictionary()


def _described(rt: ModelRunner) -> tuple[_Outputs, dict[bool, tuple[OutputSpec, ...]]]:
    """A version's outputs (name -> datatype, shape) and its default output specs (all of
    them, JSON or binary), computed once per loaded version."""
    found = _DESCRIBED.get(rt)
    if found is None:
        available = {n: (d, s) for n, d, s in outputs_of(rt)}
        every = {b: tuple(OutputSpec(n, b) for n in available) for b in (False, True)}
        found = _DESCRIBED[rt] = (available, every)
    return found


def _infer() -> tuple[Prepare, Encode]:
    """Infer rows given as tensors (JSON ``data`` or binary tensor data); answers ``label``
    and ``probabilities`` (or the requested ``outputs``), binary when asked."""
    decoded = Decoded()

    def prepare(gw: Gateway, req: HttpRequest, params: dict[str, str], body: bytes) -> Job:
        rt = gw.runtime(params["name"], params.get("version"))
        key = (req.header(b"inference-header-content-length"), body)
        features = rt.manifest.features
        seen = decoded.find(key, len(body))
        if seen is not None and seen[0] == features:
            ireq = seen[1]
        else:
            ireq = decode_infer_request(body, key[0], features, gw.settings.max_rows)
            decoded.keep(key, len(body), features, ireq, ireq.rows)
        available, every = _described(rt)
        specs = ireq.outputs or every[ireq.binary_default]
        for spec in specs:
            if spec.name not in available:
                raise InvalidInput(f"unknown output {spec.name!r:.40} (this model has "
                                   f"{', '.join(available)})", code="bad_request")
        deadline_s = (ireq.timeout_us / 1e6 if ireq.timeout_us is not None
                      else timeout_s(gw, req))
        wanted = frozenset(_OUTPUT_OF[s.name] for s in specs)
        return Job(rt, ireq.rows, wanted, deadline_s, (ireq, specs, available))

    def encode(job: Job, answer: Answer) -> Reply:
        ireq, specs, available = job.extra
        m = job.rt.manifest
        n = len(ireq.rows)
        encoded = []
        for spec in specs:
            datatype, shape = available[spec.name]
            encoded.append((spec, datatype, [n, *shape[1:]],
                            answer.values[_OUTPUT_OF[spec.name]]))
        content, header_len = encode_infer_response(
            model_name=m.name, model_version=str(m.version), request_id=ireq.request_id,
            outputs=encoded,
        )
        reply = Reply(200, content, model=m.name, version=str(m.version), cache=answer.source)
        if header_len is not None:
            reply.headers.append((b"inference-header-content-length",
                                  str(header_len).encode()))
            reply.content_type = b"application/octet-stream"
        return reply

    return prepare, encode


def doors() -> list[Door]:
    """The infer doors (latest version, or the one named), sharing a decoding memo."""
    prepare, encode = _infer()
    return [Door("POST", "/v2/models/{name}/infer", prepare, encode, render_error),
            Door("POST", "/v2/models/{name}/versions/{version}/infer", prepare, encode,
                 render_error)]


async def server_metadata() -> Response:
    """Server name, version and supported protocol extensions."""
    return json_response({"name": SERVER_NAME, "version": SERVER_VERSION,
                          "extensions": ["binary_tensor_data"]})


async def live() -> Response:
    return json_response({"live": True})


async def ready(request: Request) -> Response:
    gw = gateway_of(request)
    is_ready = gw.ready
    return json_response({"ready": is_ready}, 200 if is_ready else 503)


async def model_metadata(name: str, request: Request, version: str | None = None) -> Response:
    """Inputs (one ``[n, n_features]`` tensor, or one ``[n, 1]`` tensor per feature) and
    outputs of a model version (default: latest)."""
    gw = gateway_of(request)
    try:
        rt = gw.runtime(name, version)
    except GatewayError as exc:
        return _error(gw, exc)
    m = rt.manifest
    versions = [str(m.version)] if version is not None else [str(v) for v in
                                                            sorted(gw.models[name])]
    meta: dict[str, Any] = {
        "name": m.name,
        "versions": versions,
        "platform": m.family,
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, len(m.features)]}],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs_of(rt)],
        "parameters": {"version": str(m.version), "sha256": m.sha256, "task": m.task,
                       "features": list(m.features), "classes": list(m.classes),
                       "backends": rt.backends, "settings": rt.settings,
                       "redis": gw.redis_use(rt)},
    }
    return json_response(meta)


async def model_ready(name: str, request: Request, version: str | None = None) -> Response:
    gw = gateway_of(request)
    try:
        rt = gw.runtime(name, version)
    except GatewayError as exc:
        return _error(gw, exc)
    ready_now = gw.accepting
    return json_response({"name": name, "version": str(rt.manifest.version), "ready": ready_now},
                         200 if ready_now else 503)


def _admin(gw: Gateway, request: Request) -> Response | None:
    """None when the request carries the admin token, else the refusal (403 when no token is
    configured, 401 when it is missing or wrong; compared in constant time)."""
    token = gw.settings.admin_token
    if token is None:
        return _error(gw, Forbidden("the model repository API is disabled: set "
                                    "GATEWAY_ADMIN_TOKEN to enable it"))
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
        response = _error(gw, Unauthorized("a valid 'Authorization: Bearer <token>' is "
                                           "required"))
        response.headers["www-authenticate"] = "Bearer"
        return response
    return None


async def repository_index(request: Request) -> Response:
    """Every model version in the store, with its state (``READY``, ``UNAVAILABLE`` with a
    reason, ``UNLOADED``). Needs the admin token."""
    gw = gateway_of(request)
    refused = _admin(gw, request)
    if refused is not None:
        return refused
    return json_response(gw.registry.index())


async def repository_load(name: str, request: Request) -> Response:
    """Serve every version the store has of ``name`` (again), in every gateway process sharing
    the Redis (``Gateway.change_repository``; the answer says which). Needs the admin token."""
    return await _change(gateway_of(request), request, "load", name)


async def repository_unload(name: str, request: Request) -> Response:
    """Stop serving ``name`` until it is loaded again, in every gateway process sharing the
    Redis (the answer says which). Needs the admin token."""
    return await _change(gateway_of(request), request, "unload", name)


async def _change(gw: Gateway, request: Request, op: str, name: str) -> Response:
    refused = _admin(gw, request)
    if refused is not None:
        return refused
    try:
        reached = await gw.change_repository(op, name)
    except GatewayError as exc:
        return _error(gw, exc)
    return json_response(reached)


def v2_router() -> APIRouter:
    """The ``/v2`` health and metadata routes, to include in the app."""
    r = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol (V2)"])
    r.add_api_route("", server_metadata, methods=["GET"])
    r.add_api_route("/", server_metadata, methods=["GET"], include_in_schema=False)
    r.add_api_route("/health/live", live, methods=["GET"])
    r.add_api_route("/health/ready", ready, methods=["GET"])
    for base in ("/models/{name}", "/models/{name}/versions/{version}"):
        r.add_api_route(base, model_metadata, methods=["GET"])
        r.add_api_route(base + "/ready", model_ready, methods=["GET"])
    r.add_api_route("/repository/index", repository_index, methods=["POST"],
                    tags=["Model repository"])
    r.add_api_route("/repository/models/{name}/load", repository_load, methods=["POST"],
                    tags=["Model repository"])
    r.add_api_route("/repository/models/{name}/unload", repository_unload, methods=["POST"],
                    tags=["Model repository"])
    return r


_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
    "datatype": {"type": "string"}, "parameters": {"type": "object"},
    "data": {"type": "array"}}}


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI entries of the infer doors (JSON form; binary tensor data also accepted)."""
    error = {"application/json": {"schema": {"type": "object", "required": ["error"],
                                             "properties": {"error": {"type": "string"}}}}}
    request = {
        "type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string"}, "parameters": {"type": "object"}}}},
        },
    }
    example = {"id": "1", "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP64",
                                      "data": [5.1, 3.5, 1.4, 0.2, 6.3, 3.3, 6.0, 2.5]}]}
    response = {"type": "object", "required": ["model_name", "outputs"], "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"},
        "id": {"type": "string"}, "outputs": {"type": "array", "items": _TENSOR}}}

    def infer_entry(params: list[str]) -> dict[str, Any]:
        return {"post": {
            "tags": ["Open Inference Protocol (V2)"],
            "summary": "Inference",
            "description": (
                "One `[n, n_features]` tensor (any numeric datatype) or one `[n, 1]` tensor "
                "per feature, as JSON `data` or binary tensor data "
                "(`Inference-Header-Content-Length`). Outputs: `label` (`BYTES` for string "
                "classes, `INT64` for integer ones) and `probabilities` (`FP64 [n, k]`) for "
                "classifiers, `prediction` (`FP64`) for regressors."),
            "parameters": [{"name": p, "in": "path", "required": True,
                            "schema": {"type": "string"}} for p in params],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": request, "example": example}}},
            "responses": {
                "200": {"description": "Outputs", "content": {
                    "application/json": {"schema": response}}},
                "400": {"description": "bad request", "content": error},
                "404": {"description": "unknown model or version", "content": error},
                "413": {"description": "body over the limit", "content": error},
                "503": {"description": "overloaded or shutting down", "content": error},
                "504": {"description": "deadline exceeded", "content": error},
            },
        }}

    return {"/v2/models/{name}/infer": infer_entry(["name"]),
            "/v2/models/{name}/versions/{version}/infer": infer_entry(["name", "version"])}
