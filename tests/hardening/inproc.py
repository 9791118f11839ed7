"""An in-process gateway whose uncaught exceptions come back as 500 (as a server answers),
and raw access to the test-session Redis for forging cache values."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from gateway import Settings, create_app
from model_store import ModelStore


@asynccontextmanager
async def gateway_client(
    root: Path, *, loader: Callable[[Path], Any] | None = None, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The app over the store at ``root`` with ``Settings(**overrides)``, its lifespan running;
    a client whose requests see its state."""
    settings = Settings(model_root=root, **overrides)
    store = ModelStore(root, loader=loader) if loader is not None else None
    app = create_app(settings, store=store)
    async with app.router.lifespan_context(app) as state:
        assert state is not None

        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await app(dict(scope, state=dict(state)), receive, send)

        transport = httpx.ASGITransport(app=asgi, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


async def wait_for_keys(r: aioredis.Redis, prefix: str, count: int = 1) -> list[bytes]:
    """The keys under ``prefix:`` once at least ``count`` exist (the gateway writes in the
    background; each lookup here yields to it). Bounded."""
    for _ in range(20_000):
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if len(keys) >= count:
            return keys
    raise AssertionError(f"no key under {prefix}: in redis")


async def forge(r: aioredis.Redis, prefix: str, value: bytes, count: int = 1) -> int:
    """Overwrite every key under ``prefix:`` with ``value``; how many."""
    keys = await wait_for_keys(r, prefix, count)
    for key in keys:
        await r.set(key, value, ex=600)
    return len(keys)
