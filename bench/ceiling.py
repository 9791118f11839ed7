"""The stack's ceiling: a bare Starlette endpoint with a constant answer, served by the same
uvicorn (uvloop, httptools) as the gateway. Every figure can be read as a fraction of it."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_BODY = b'{"prediction":"setosa"}'


async def _constant(_request: Request) -> Response:
    return Response(_BODY, media_type="application/json")


app = Starlette(routes=[Route("/predict", _constant), Route("/readyz", _constant)])
