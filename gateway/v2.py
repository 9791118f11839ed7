"""Open Inference Protocol (KServe V2) REST endpoints under ``/v2``.

Every row of an infer request goes through the same keys, cache tiers, single-flight and
micro-batcher as ``/v1`` and ``/predict``. Errors are ``{"error": "<message>"}``: 400 for a bad
request, 404 for an unknown model or version, 413 for an oversized body, 503 when not ready or
overloaded, 504 past the deadline.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.errors import GatewayError, InvalidInput
from gateway.inputs import read_body
from gateway.predictor import ModelRuntime
from gateway.responses import json_response
from gateway.runtime import Gateway, gateway_of
from gateway.v2_codec import OutputSpec, decode_infer_request, encode_infer_response

__all__ = ["v2_router"]

SERVER_NAME = "inference-gateway"
SERVER_VERSION = "0.1.0"
_HEADER_LENGTH = "inference-header-content-length"
_V2_STATUS = {422: 400, 400: 400}  # our validation errors are the protocol's bad requests




def _error(gw: Gateway, exc: GatewayError) -> Response:
    gw.count_rejection(exc)
    status = _V2_STATUS.get(exc.status, exc.status)
    return json_response({"error": exc.message}, status, exc.headers)


def _outputs(rt: ModelRuntime) -> list[tuple[str, str, list[int]]]:
    m = rt.manifest
    if m.task == "regression":
        return [("prediction", "FP64", [-1])]
    out = [("label", "BYTES", [-1])]
    if rt.model.has_proba:
        out.append(("probabilities", "FP64", [-1, len(m.classes)]))
    return out


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
    return json_response({
        "name": m.name,
        "versions": versions,
        "platform": "sklearn",
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, len(m.features)]}],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in _outputs(rt)],
        "parameters": {"version": str(m.version), "sha256": m.sha256, "task": m.task,
                       "features": list(m.features), "classes": list(m.classes),
                       "backends": rt.backends},
    })


async def model_ready(name: str, request: Request, version: str | None = None) -> Response:
    gw = gateway_of(request)
    try:
        rt = gw.runtime(name, version)
    except GatewayError as exc:
        return _error(gw, exc)
    ready_now = gw.accepting
    return json_response({"name": name, "version": str(rt.manifest.version), "ready": ready_now},
                 200 if ready_now else 503)


async def infer(name: str, request: Request, version: str | None = None) -> Response:
    """Infer rows given as tensors (JSON ``data`` or binary tensor data); answers ``label``
    and ``probabilities`` (or the requested ``outputs``), binary when asked."""
    gw = gateway_of(request)
    try:
        rt = gw.runtime(name, version)
        body = await read_body(request, gw.settings.max_body_bytes)
        req = decode_infer_request(body, request.headers.get(_HEADER_LENGTH),
                                   rt.manifest.features, gw.settings.max_rows)
        available = {n: (d, s) for n, d, s in _outputs(rt)}
        specs = req.outputs or tuple(OutputSpec(n, req.binary_default) for n in available)
        for spec in specs:
            if spec.name not in available:
                raise _unknown_output(spec.name, available)
        timeout_s = (req.timeout_us / 1e6 if req.timeout_us is not None
                     else gw.timeout_s(request.headers.get("x-request-timeout-ms")))
        want_proba = any(s.name == "probabilities" for s in specs)
        want_labels = any(s.name in ("label", "prediction") for s in specs)
        calls = []
        if want_labels:
            calls.append(gw.predict(rt, req.rows, False, timeout_s))
        if want_proba:
            calls.append(gw.predict(rt, req.rows, True, timeout_s))
        results = await asyncio.gather(*calls)
    except GatewayError as exc:
        return _error(gw, exc)
    values: dict[str, Any] = {}
    if want_labels:
        values["label"] = values["prediction"] = results[0][0]
    if want_proba:
        values["probabilities"] = np.asarray(results[-1][0], dtype=np.float64)
    n = len(req.rows)
    encoded = []
    for spec in specs:
        datatype, shape = available[spec.name]
        shape = [n, *shape[1:]]
        encoded.append((spec, datatype, shape, values[spec.name]))
    content, header_len = encode_infer_response(
        model_name=rt.manifest.name, model_version=str(rt.manifest.version),
        request_id=req.request_id, outputs=encoded,
    )
    if header_len is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_len)})


def _unknown_output(name: str, available: dict[str, Any]) -> GatewayError:
    return InvalidInput(f"unknown output {name!r} (this model has {', '.join(available)})",
                        code="bad_request")


def v2_router() -> APIRouter:
    """The ``/v2`` routes, to include in the app."""
    r = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])
    r.add_api_route("", server_metadata, methods=["GET"])
    r.add_api_route("/health/live", live, methods=["GET"])
    r.add_api_route("/health/ready", ready, methods=["GET"])
    for base in ("/models/{name}", "/models/{name}/versions/{version}"):
        r.add_api_route(base, model_metadata, methods=["GET"])
        r.add_api_route(base + "/ready", model_ready, methods=["GET"])
        r.add_api_route(base + "/infer", infer, methods=["POST"])
    return r
