"""Repository changes reach every gateway process sharing the Redis: two gateways (in this
process) on one real redis-server; without Redis the answer says the change stayed here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.runtime import Gateway
from gateway.settings import Settings
from tests.support import serve_with_state, wait_for

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "Bearer s3cret"}


@asynccontextmanager
async def replicas(store: Path, n: int, **settings: Any
                   ) -> AsyncIterator[list[tuple[httpx.AsyncClient, Gateway]]]:
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(n):
            app = create_app(Settings(model_root=store, model_poll_s=0, admin_token="s3cret",
                                      gc_freeze=False, **settings))
            out.append(await stack.enter_async_context(serve_with_state(app)))
        for _, gw in out:
            if gw.announcer is not None:
                await gw.announcer.subscribed.wait()
        yield out


async def test_unload_and_load_reach_every_gateway_on_the_redis(
        store_root: Path, redis_server: Any) -> None:
    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    async with replicas(store_root, 2, redis_url=url, cache_prefix="announce") as (
            (a, gw_a), (_b, gw_b)):
        r = await a.post("/v2/repository/models/iris/unload", headers=AUTH)
        assert (r.status_code, r.json()) == (200, {"processes": "all", "others": 1})
        assert "iris" not in gw_a.models
        await wait_for(lambda: "iris" not in gw_b.models)
        r = await a.post("/v2/repository/models/iris/load", headers=AUTH)
        assert r.json() == {"processes": "all", "others": 1}
        await wait_for(lambda: "iris" in gw_b.models)
        index = {e["name"]: e["state"] for e in gw_b.registry.index()}
        assert index == {"iris": "READY"}


async def test_another_prefix_does_not_hear_it(store_root: Path, redis_server: Any) -> None:
    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    async with replicas(store_root, 1, redis_url=url, cache_prefix="one") as [(a, _)], \
            replicas(store_root, 1, redis_url=url, cache_prefix="two") as [(_, other)]:
        r = await a.post("/v2/repository/models/iris/unload", headers=AUTH)
        assert r.json() == {"processes": "all", "others": 0}
        assert "iris" in other.models


async def test_without_redis_the_answer_says_this_process_only(store_root: Path) -> None:
    async with replicas(store_root, 1) as [(a, gw)]:
        r = await a.post("/v2/repository/models/iris/unload", headers=AUTH)
        assert (r.status_code, r.json()) == (200, {"processes": "this"})
        assert "iris" not in gw.models
