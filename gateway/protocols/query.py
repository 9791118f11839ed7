"""``GET /predict?<feature>=<value>&…``: one row of the default model from query parameters.

Answers ``{"prediction": <label>}`` with ``X-Cache`` saying where it came from; errors are the
gateway's own ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from typing import Any

from gateway.core.pipeline import Answer
from gateway.core.runner import Output
from gateway.protocols.http import (
    Decoded,
    Door,
    HttpRequest,
    Job,
    Reply,
    error_reply,
    timeout_s,
)
from gateway.protocols.inputs import parse_query_string
from gateway.runtime import Gateway
from model_store import Manifest

__all__ = ["door", "openapi_path"]

_LABEL: frozenset[Output] = frozenset({"label"})
_SOURCES = {s: s.encode() for s in ("l1", "l2", "miss")}


def door() -> Door:
    """The ``GET /predict`` door, with a decoding memo of its own."""
    decoded = Decoded()

    def prepare(gw: Gateway, req: HttpRequest, _params: dict[str, str], _body: bytes) -> Job:
        rt = gw.runtime(gw.settings.default_model)
        query: bytes = req.scope["query_string"]
        features = rt.manifest.features
        seen = decoded.find(query, len(query))
        if seen is not None and seen[0] == features:
            row = seen[1]
        else:
            row = parse_query_string(query, features)  # raises for a bad query: not kept
            decoded.keep(query, len(query), features, row, row)
        return Job(rt, row, _LABEL, timeout_s(gw, req))

    def encode(job: Job, answer: Answer) -> Reply:
        m = job.rt.manifest
        return Reply(200, b'{"prediction":' + answer.values["label"][0] + b"}",
                     [(b"x-cache", _SOURCES[answer.sources[0]])], model=m.name,
                     version=str(m.version), cache=answer.sources[0])

    return Door("GET", "/predict", prepare, encode, error_reply, reads_body=False)


def openapi_path(manifest: Manifest | None, error_schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI entry of ``GET /predict``: one query parameter per feature of the default
    model (``manifest``; none listed when it is not loadable)."""
    features = manifest.features if manifest is not None else ()
    error = {"application/json": {"schema": error_schema}}
    return {"get": {
        "summary": "Predict one row of the default model from query parameters",
        "description": (
            "One query parameter per feature of the default model (`GATEWAY_DEFAULT_MODEL`), "
            "named as in its manifest, each a JSON number. The `X-Cache` response header says "
            "where the answer came from (`l1`, `l2` or `miss`)."
        ),
        "parameters": [
            {"name": f, "in": "query", "required": True, "schema": {"type": "number"}}
            for f in features
        ],
        "responses": {
            "200": {"description": "The prediction", "content": {"application/json": {
                "schema": {"type": "object", "required": ["prediction"],
                           "properties": {"prediction": {}}}}}},
            "404": {"description": "default model not loaded", "content": error},
            "422": {"description": "missing, unknown or non-numeric parameters",
                    "content": error},
            "503": {"description": "overloaded (see `Retry-After`) or shutting down",
                    "content": error},
            "504": {"description": "deadline (`X-Request-Timeout-Ms`) exceeded",
                    "content": error},
        },
    }}
