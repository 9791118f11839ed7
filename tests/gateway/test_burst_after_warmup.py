"""Identical misses are merged after warm-up, on every path a miss can take.

Two gateways (``Gateway.open``, in this process) stand for two replicas on one real Redis (a
redis-server or a 3-master Cluster of the test's own). Each is warmed with ordinary traffic
first: 50 new rows asked of A, then asked of B (until B finds them in Redis where Redis is
forced on), so calls are measured and placed (inline, thread). Then a burst of identical
requests for a new row: tight (every request in one event-loop step, as the HTTP fast lane
begins them) or loose (one request every 5 ms, over about a second), to A alone or split
between A and B. Model calls are counted from each gateway's metrics.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.procs import RedisCluster, redis_cluster
from gateway.core.pipeline import Answer, Pending
from gateway.metrics import Metrics
from gateway.runtime import Gateway
from gateway.settings import Settings
from model_store import ModelStore
from tests.hardening.procs import metric
from tests.support import ask

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.slow]

BURST = 200
LABEL: frozenset[Any] = frozenset({"label"})
_rows = itertools.count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def _new_row() -> np.ndarray:
    """A row no earlier test asked for (the Redis servers are shared by the module)."""
    i = next(_rows)
    return np.array([[4.0 + (i % 97) / 25, 2.0 + (i // 97) / 50, 1.5, 0.3]])


def calls(gw: Gateway) -> float:
    return metric(gw.metrics.render().decode(), "gateway_model_calls_total")


def inline_calls(gw: Gateway) -> float:
    return metric(gw.metrics.render().decode(), "gateway_model_exec_total", place="inline")


@asynccontextmanager
async def replicas(store: Path, **settings: Any) -> AsyncIterator[tuple[Gateway, Gateway]]:
    async with AsyncExitStack() as stack:
        pair = []
        for _ in range(2):
            gw = await Gateway.open(Settings(model_root=store, model_poll_s=0,
                                             backend="sklearn", gc_freeze=False, **settings),
                                    ModelStore(store), Metrics())
            stack.push_async_callback(gw.aclose)
            pair.append(gw)
        yield pair[0], pair[1]


async def warm(a: Gateway, b: Gateway, *, shared: bool) -> None:
    """50 new rows asked of A, then of B (until B finds them in Redis, if ``shared``)."""
    rows = [_new_row() for _ in range(50)]
    for row in rows:
        await ask(a, row)
    for row in rows:
        for _ in range(1000):
            source = (await ask(b, row)).source
            if source == "l2" or not shared:
                break
            assert source == "l1", "B computed a row A had stored in Redis"
        else:
            raise AssertionError("B never found A's row in Redis")
    if a.l2 is not None:
        await a.l2.flush_writes()


async def tight(targets: list[Gateway], row: np.ndarray) -> list[Answer]:
    """Every request begun in one event-loop step, as the HTTP fast lane does, then finished."""
    begun = [gw.begin([(gw.runtime("iris"), row, LABEL)
                       for _ in range(BURST // len(targets))]) for gw in targets]
    out: list[Answer] = []
    waits = []
    for gw, results in zip(targets, begun, strict=True):
        for r in results:
            if type(r) is Answer:
                out.append(r)
            else:
                assert type(r) is Pending, r
                waits.append(gw.finish(r, 30.0))
    out += await asyncio.gather(*waits)
    return out


async def loose(targets: list[Gateway], row: np.ndarray) -> list[Answer]:
    """One request every 5 ms (a slow client), alternating between ``targets``."""
    tasks = []
    for i in range(BURST):
        tasks.append(asyncio.ensure_future(ask(targets[i % len(targets)], row)))
        await asyncio.sleep(0.005)  # the client's pace, not a synchronisation
    return list(await asyncio.gather(*tasks))


PATHS = {  # (execution, batch): every way a miss reaches the model
    # Inline is where the demo forest goes once measured (``auto``), forced here so that a
    # preempted call on a loaded machine cannot send it to the thread for a while.
    "inline": ("inline", "on"),
    "inline-unbatched": ("inline", "off"),
    "thread": ("thread", "on"),
    "thread-unbatched": ("thread", "off"),
}
SHARING = {  # (redis, l2_min_call_us, coalesce_remote)
    "l1-only": (None, None, "off"),
    "redis-forced": ("single", 0, "auto"),
    "redis-default": ("single", None, "auto"),
    "redis-forced-no-remote": ("single", 0, "off"),
    "cluster-forced": ("cluster", 0, "auto"),
    "cluster-default": ("cluster", None, "auto"),
    "cluster-forced-no-remote": ("cluster", 0, "off"),
}


@pytest.mark.parametrize("sharing", list(SHARING))
@pytest.mark.parametrize("path", list(PATHS))
async def test_after_warmup_a_burst_costs_one_call_per_process(
        session_store: Path, redis_server: Any, request: pytest.FixtureRequest,
        iris_estimator: Any, path: str, sharing: str) -> None:
    execution, batch = PATHS[path]
    redis, min_call_us, remote = SHARING[sharing]
    settings: dict[str, Any] = {"execution": execution, "batch": batch,
                                "coalesce_remote": remote, "l2_min_call_us": min_call_us,
                                "cache_prefix": f"warm-{path}-{sharing}",
                                "redis_timeout_ms": 500, "remote_lease_min_ms": 3000}
    if redis == "single":
        settings["redis_url"] = f"redis://{redis_server.host}:{redis_server.port}/0"
    elif redis == "cluster":
        settings["redis_url"] = request.getfixturevalue("cluster").url
    async with replicas(session_store, **settings) as (a, b):
        forced = redis is not None and min_call_us == 0
        await warm(a, b, shared=forced)
        use = [gw.redis_use(gw.runtime("iris")) for gw in (a, b)]
        if redis is None or forced:
            assert [u["consulted"] for u in use] == [forced] * 2, use
        # By default the rule weighs this machine's measured call against its round trip:
        # whichever it chose, a burst costs one call a process.
        consulted = all(u["consulted"] for u in use)
        for burst in (tight, loose):
            row = _new_row()
            expected = orjson_label(iris_estimator, row)
            before, inline_before = calls(a), inline_calls(a)
            answers = await burst([a], row)
            assert [x.values["label"][0] for x in answers] == [expected] * BURST
            assert calls(a) - before == 1, f"{burst.__name__} burst to A"
            if execution == "inline":
                assert inline_calls(a) - inline_before == 1  # the inline path was taken

            row = _new_row()
            expected = orjson_label(iris_estimator, row)
            before_a, before_b = calls(a), calls(b)
            answers = await burst([a, b], row)
            assert [x.values["label"][0] for x in answers] == [expected] * BURST
            per_process = (calls(a) - before_a, calls(b) - before_b)
            assert max(per_process) <= 1, f"{burst.__name__} burst over A and B: {per_process}"
            if burst is tight and consulted and remote == "auto":
                assert sum(per_process) == 1, f"tight burst over A and B: {per_process}"


def orjson_label(estimator: Any, row: np.ndarray) -> bytes:
    import orjson

    return orjson.dumps(estimator.predict(row).tolist()[0])
