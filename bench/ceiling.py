"""The stack's ceiling: a bare Starlette endpoint with a constant answer, served by the same
uvicorn (uvloop, httptools) as the gateway. Every figure can be read as a fraction of it.

It answers every door the bench sends (``GET /predict``, ``POST /v1/models/{name}/predict``,
``POST /v2/models/{name}/infer``), reading a POST's whole body first, and nothing else."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_BODY = b'{"prediction":"setosa"}'


async def _constant(_request: Request) -> Response:
    return Response(_BODY, media_type="application/json")


async def _constant_post(request: Request) -> Response:
    await request.body()
    return Response(_BODY, media_type="application/json")


app = Starlette(routes=[
    Route("/predict", _constant),
    Route("/readyz", _constant),
    Route("/v1/models/{name}/predict", _constant_post, methods=["POST"]),
    Route("/v2/models/{name}/infer", _constant_post, methods=["POST"]),
])
