"""The ``/v1`` doors: the gateway's own ``POST /v1/models/{name}/predict`` and KServe's V1
data plane ``POST /v1/models/{name}:predict``.

The gateway's body is ``{"instances": [...], "version"?: …, "probabilities"?: bool}``, each
instance a list (features in order) or an object keyed by feature name; the answer keeps row
order and says per row where it came from (``l1``, ``l2``, ``miss``). KServe's body is
``{"instances": [...]}`` answered by ``{"predictions": [...]}`` (the latest version). Errors
are ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.core.pipeline import Answer
from gateway.core.runner import Output
from gateway.errors import InvalidInput
from gateway.protocols.http import (
    Decoded,
    Door,
    Encode,
    HttpRequest,
    Job,
    Prepare,
    Reply,
    error_reply,
    timeout_s,
)
from gateway.protocols.inputs import parse_instances, parse_json, parse_rows_body
from gateway.runtime import Gateway

__all__ = ["doors", "openapi_paths"]

_BODY_KEYS = frozenset({"instances", "version", "probabilities"})
_KSERVE_KEYS = frozenset({"instances"})
_LABEL: frozenset[Output] = frozenset({"label"})
_BOTH: frozenset[Output] = frozenset({"label", "probabilities"})
_SOURCES = {s: orjson.dumps(s) for s in ("l1", "l2", "miss")}


def _v1_body(body: bytes) -> tuple[Any, bool, Any]:
    """The version asked for, whether probabilities are, and the instances."""
    payload = parse_json(body)
    if type(payload) is not dict:
        raise InvalidInput("body: expected a JSON object with 'instances'", code="invalid_body")
    if len(payload) > 1 or "instances" not in payload:
        unknown = sorted(set(payload) - _BODY_KEYS)
        if unknown:
            raise InvalidInput(f"body: unknown field(s) {', '.join(unknown)}"[:200],
                               code="invalid_body")
        if "instances" not in payload:
            raise InvalidInput("body: 'instances' is required", code="invalid_body")
    proba = payload.get("probabilities", False)
    if type(proba) is not bool:
        raise InvalidInput("probabilities: expected true or false", code="invalid_body")
    return payload.get("version"), proba, payload["instances"]


def _kserve_body(body: bytes) -> Any:
    """The instances of a KServe V1 body."""
    payload = parse_json(body)
    if type(payload) is not dict or set(payload) != {"instances"}:
        raise InvalidInput("body: expected a JSON object with 'instances' only",
                           code="invalid_body")
    return payload["instances"]


def _v1_door(decoded: Decoded) -> tuple[Prepare, Encode]:
    def prepare(gw: Gateway, req: HttpRequest, params: dict[str, str], body: bytes) -> Job:
        deadline_s = timeout_s(gw, req)
        seen = decoded.find(body, len(body))
        if seen is not None:
            features, (version, proba, rows) = seen
            rt = gw.runtime(params["name"], version)
            if rt.manifest.features != features:
                seen = None
        if seen is None:
            fast = parse_rows_body(body, _BODY_KEYS, gw.settings.max_rows)
            if fast is not None:
                others, rows = fast
                version, proba = others.get("version"), others.get("probabilities", False)
                if type(proba) is not bool:  # named before the version's lookup, as below
                    fast = None
                else:
                    rt = gw.runtime(params["name"], version)
                    features = rt.manifest.features
                    if rows.shape[1] != len(features):
                        fast = None  # the whole decoding names what is wrong
            if fast is None:
                version, proba, instances = _v1_body(body)
                rt = gw.runtime(params["name"], version)
                features = rt.manifest.features
                rows = parse_instances(instances, features, gw.settings.max_rows)
            decoded.keep(body, len(body), features, (version, proba, rows), rows)
        return Job(rt, rows, _BOTH if proba else _LABEL, deadline_s, proba)

    def encode(job: Job, answer: Answer) -> Reply:
        m = job.rt.manifest
        parts = [b'{"model":', orjson.dumps(m.name), b',"version":"', str(m.version).encode(),
                 b'","predictions":[', b",".join(answer.values["label"]), b"]"]
        if job.extra:
            parts += [b',"classes":', orjson.dumps(list(m.classes)), b',"probabilities":[',
                      b",".join(answer.values["probabilities"]), b"]"]
        parts += [b',"cache":[', b",".join([_SOURCES[s] for s in answer.sources]), b"]}"]
        return Reply(200, b"".join(parts), model=m.name, version=str(m.version),
                     cache=answer.source)

    return prepare, encode


def _kserve_door(decoded: Decoded) -> tuple[Prepare, Encode]:
    def prepare(gw: Gateway, req: HttpRequest, params: dict[str, str], body: bytes) -> Job:
        deadline_s = timeout_s(gw, req)
        seen = decoded.find(body, len(body))
        fast = parse_rows_body(body, _KSERVE_KEYS, gw.settings.max_rows) if seen is None \
            else None
        instances = _kserve_body(body) if seen is None and fast is None else None
        rt = gw.runtime(params["name"])
        features = rt.manifest.features
        if seen is not None and seen[0] == features:
            rows = seen[1]
        else:
            if fast is not None and fast[1].shape[1] == len(features):
                rows = fast[1]
            else:
                if instances is None:
                    instances = _kserve_body(body)
                rows = parse_instances(instances, features, gw.settings.max_rows)
            decoded.keep(body, len(body), features, rows, rows)
        return Job(rt, rows, _LABEL, deadline_s)

    def encode(job: Job, answer: Answer) -> Reply:
        m = job.rt.manifest
        return Reply(200, b'{"predictions":[' + b",".join(answer.values["label"]) + b"]}",
                     model=m.name, version=str(m.version), cache=answer.source)

    return prepare, encode


def doors() -> list[Door]:
    """The ``/v1`` doors, each with a decoding memo of its own."""
    return [Door("POST", "/v1/models/{name}/predict", *_v1_door(Decoded()), error_reply),
            Door("POST", "/v1/models/{name}:predict", *_kserve_door(Decoded()), error_reply)]


def openapi_paths(error_schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI entries of the ``/v1`` doors."""
    error = {"application/json": {"schema": error_schema}}
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    kserve = {"post": {
        "summary": "Predict rows (KServe V1 data plane)",
        "description": "KServe's V1 protocol: `instances` in, `predictions` out (labels or "
                       "regression values, latest version).",
        "parameters": name,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "required": ["instances"],
                       "additionalProperties": False,
                       "properties": {"instances": {"type": "array", "minItems": 1, "items": {
                           "type": "array", "items": {"type": "number"}}}}},
            "example": {"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]},
        }}},
        "responses": {
            "200": {"description": "Predictions in row order", "content": {"application/json": {
                "schema": {"type": "object", "required": ["predictions"],
                           "properties": {"predictions": {"type": "array"}}}}}},
            "400": {"description": "malformed JSON", "content": error},
            "404": {"description": "unknown model", "content": error},
            "413": {"description": "body or rows over a limit", "content": error},
            "422": {"description": "invalid rows or fields", "content": error},
            "503": {"description": "overloaded or shutting down", "content": error},
            "504": {"description": "deadline exceeded", "content": error},
        },
    }}
    return {"/v1/models/{name}/predict": _own(error, name),
            "/v1/models/{name}:predict": kserve}


def _own(error: dict[str, Any], name: list[dict[str, Any]]) -> dict[str, Any]:
    return {"post": {
        "summary": "Predict rows with a model",
        "description": (
            "`instances` as lists (features in order) or as objects keyed by feature name; "
            "optional `version` (default: latest) and `probabilities`. The answer keeps row "
            "order and says, per row, where it came from (`l1`, `l2`, `miss`)."
        ),
        "parameters": name,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {
                "type": "object",
                "required": ["instances"],
                "additionalProperties": False,
                "properties": {
                    "instances": {"type": "array", "minItems": 1, "items": {"oneOf": [
                        {"type": "array", "items": {"type": "number"}},
                        {"type": "object", "additionalProperties": {"type": "number"}},
                    ]}},
                    "version": {"oneOf": [{"type": "integer", "minimum": 1},
                                          {"type": "string", "pattern": "^([0-9]+|latest)$"}]},
                    "probabilities": {"type": "boolean", "default": False},
                },
            },
            "example": {"instances": [[5.1, 3.5, 1.4, 0.2]], "probabilities": True},
        }}},
        "responses": {
            "200": {"description": "Predictions in row order", "content": {
                "application/json": {"schema": {
                    "type": "object",
                    "required": ["model", "version", "predictions", "cache"],
                    "properties": {
                        "model": {"type": "string"},
                        "version": {"type": "string"},
                        "predictions": {"type": "array"},
                        "classes": {"type": "array"},
                        "probabilities": {"type": "array",
                                          "items": {"type": "array",
                                                    "items": {"type": "number"}}},
                        "cache": {"type": "array", "items": {"enum": ["l1", "l2", "miss"]}},
                    },
                }}}},
            "400": {"description": "malformed JSON", "content": error},
            "404": {"description": "unknown model or version", "content": error},
            "413": {"description": "body or rows over a limit", "content": error},
            "422": {"description": "invalid rows or fields", "content": error},
            "500": {"description": "the model failed on this input", "content": error},
            "503": {"description": "overloaded (see `Retry-After`) or shutting down",
                    "content": error},
            "504": {"description": "deadline (`X-Request-Timeout-Ms`) exceeded",
                    "content": error},
        },
    }}
