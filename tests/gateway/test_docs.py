"""API docs: served offline, and every example they show works."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support import probed_app

pytestmark = pytest.mark.anyio

_HOST = re.compile(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


async def test_docs_pages_and_their_assets_are_served_locally(session_store: Path) -> None:
    async with probed_app(session_store) as (client, _, _):
        for page in ("/docs", "/redoc"):
            r = await client.get(page)
            assert r.status_code == 200
            assert not _HOST.findall(r.text), _HOST.findall(r.text)
            for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', r.text):
                assert (await client.get(asset)).status_code == 200, asset
        assert "swagger-ui-bundle.js" in (await client.get("/docs")).text


async def test_every_documented_example_succeeds(session_store: Path) -> None:
    async with probed_app(session_store) as (client, _, _):
        schema = (await client.get("/openapi.json")).json()
        tried = 0
        for path, item in schema["paths"].items():
            for method, op in item.items():
                body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
                if "example" not in body:
                    continue
                url = path.replace("{name}", "iris").replace("{version}", "1")
                r = await client.request(method.upper(), url, json=body["example"])
                assert r.status_code == 200, (path, r.text)
                tried += 1
        assert tried >= 4


async def test_every_route_documents_its_errors_with_the_real_schema(
        session_store: Path) -> None:
    async with probed_app(session_store) as (client, _, _):
        schema: dict[str, Any] = (await client.get("/openapi.json")).json()
    for path in ("/predict", "/v1/models/{name}/predict", "/v1/models/{name}:predict",
                 "/v2/models/{name}/infer", "/v2/models/{name}"):
        (op,) = schema["paths"][path].values()
        errors = {k: v for k, v in op["responses"].items() if k.startswith(("4", "5"))}
        assert errors, path
    assert "HTTPValidationError" not in str(schema)
    for path, item in schema["paths"].items():
        for op in item.values():
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")):
                    props = response["content"]["application/json"]["schema"]["properties"]
                    want = {"type": "string"} if path.startswith("/v2") else None
                    assert "error" in props and (want is None or props["error"] == want), path
