"""Sharing through Redis by default, as a new user runs it: two real gateway processes on one
redis-server of the test's own, no ``GATEWAY_L2_MIN_CALL_US``. A dear model (a 1,000-tree
forest, milliseconds a call: well above the lookup's cost on any machine) warmed with ordinary
traffic, then bursts; Redis restarted; and the compiled demo model, whose metadata says why it
skips Redis."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from bench.procs import GatewayProcess, gateway_process, redis_server
from gateway.core.sharing import Sharing
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES, train_iris
from tests.gateway.remote_support import fire, predict_request
from tests.hardening.inproc import gateway_client, wait_for_keys
from tests.hardening.procs import metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_rows = itertools.count()


@pytest.fixture(scope="module")
def dear_forest() -> Any:
    """Iris, 1,000 trees: a lone call costs milliseconds."""
    return train_iris(trees=1000)


@pytest.fixture(scope="module")
def dear_store(tmp_path_factory: pytest.TempPathFactory, dear_forest: Any) -> Path:
    root = tmp_path_factory.mktemp("dear-models")
    ModelStore(root).register(dear_forest, "iris", features=IRIS_FEATURES, backend="sklearn")
    return root


RESTART_BOUND_S = 10.0  # the promise to operators: sharing again within this after a restart


def new_row() -> list[float]:
    i = next(_rows)
    return [4.0 + (i % 97) / 25, 2.0 + (i // 97) / 50, 2.5, 0.7]


def get(client: httpx.Client, gw: GatewayProcess, row: list[float]) -> tuple[str, str]:
    r = client.get(f"{gw.base}/predict", params=dict(zip(IRIS_FEATURES, row, strict=True)))
    assert r.status_code == 200, r.text
    return r.json()["prediction"], r.headers["x-cache"]


def calls(gw: GatewayProcess) -> float:
    return metric(gw.metrics(), "gateway_model_calls_total")


def warm(client: httpx.Client, a: GatewayProcess, b: GatewayProcess) -> None:
    """50 new rows asked of A, then asked of B until B finds each in Redis."""
    rows = [new_row() for _ in range(50)]
    for row in rows:
        get(client, a, row)
    for row in rows:
        for _ in range(1000):
            if get(client, b, row)[1] == "l2":
                break
        else:
            raise AssertionError("B never found A's answer in Redis")


async def slow_client(gw: GatewayProcess, row: list[float], n: int) -> list[str]:
    """``n`` requests for ``row``, one every 5 ms, each on a connection of its own."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as c:
        async def one() -> str:
            r = await c.get(f"{gw.base}/predict",
                            params=dict(zip(IRIS_FEATURES, row, strict=True)))
            assert r.status_code == 200, r.text
            return str(r.json()["prediction"])

        tasks = []
        for _ in range(n):
            tasks.append(asyncio.ensure_future(one()))
            await asyncio.sleep(0.005)  # the client's pace, not a synchronisation
        return list(await asyncio.gather(*tasks))


def test_replicas_share_by_default_after_warmup_and_again_after_a_redis_restart(
        dear_store: Path, tmp_path: Path, dear_forest: Any) -> None:
    with redis_server(tmp_path) as rs:
        env = {"GATEWAY_MODEL_ROOT": str(dear_store), "GATEWAY_REDIS_URL": rs.url,
               "GATEWAY_BACKEND": "sklearn", "GATEWAY_MODEL_POLL_S": "0",
               "GATEWAY_CACHE_PREFIX": "share", "GATEWAY_REDIS_TIMEOUT_MS": "500",
               "GATEWAY_REMOTE_LEASE_MIN_MS": "3000"}
        with gateway_process(env) as a, gateway_process(env) as b, httpx.Client() as client:
            warm(client, a, b)
            said = client.get(f"{a.base}/readyz").json()["redis"]["iris"]["1"]
            assert said["consulted"] and said["cross_replica"], said
            assert said["reason"].startswith("call "), said  # measured, compared

            row = new_row()
            expected = dear_forest.predict(np.array([row])).tolist()[0]
            before = calls(a) + calls(b)
            replies = asyncio.run(fire([predict_request(gw.port, row)
                                        for gw in (a, b) for _ in range(100)]))
            assert [r.prediction() for r in replies] == [expected] * 200
            assert calls(a) + calls(b) - before == 1  # a tight burst over both: one call

            row = new_row()
            expected = dear_forest.predict(np.array([row])).tolist()[0]
            before = calls(a)
            assert asyncio.run(slow_client(a, row, 200)) == [expected] * 200
            assert calls(a) - before == 1  # a loose burst to one process: one call

            rs.kill()
            rs.start()  # empty, on the same port
            deadline = time.monotonic() + RESTART_BOUND_S
            shared = False
            while not shared and time.monotonic() < deadline:
                row = new_row()
                get(client, a, row)
                shared = get(client, b, row)[1] == "l2"
            assert shared, "no answer shared through Redis within 10 s of its restart"


@pytest.mark.anyio
async def test_the_compiled_demo_model_says_why_redis_is_skipped(
        compiled_store: Path, redis_server: Any) -> None:
    settings = {"redis_url": f"redis://{redis_server.host}:{redis_server.port}/0",
                "cache_prefix": "compiled-skip"}
    async with gateway_client(compiled_store, **settings) as client:
        said: dict[str, Any] = {}
        for _ in range(100):  # ordinary traffic until calls and round trip are measured
            for _ in range(100):
                r = await client.get("/predict", params=dict(zip(IRIS_FEATURES, new_row(),
                                                                 strict=True)))
                assert r.status_code == 200
            said = (await client.get("/readyz")).json()["redis"]["iris"]["1"]
            if not said["consulted"]:
                break
        assert not said["consulted"], said
        assert said["reason"].endswith("answering again is cheaper"), said
        assert " round trip " in said["reason"] and not said["cross_replica"], said
        assert said["call_ms"] < said["reference_ms"]
        v1 = (await client.get("/v1/models")).json()["models"][0]["versions"][0]["redis"]
        v2 = (await client.get("/v2/models/iris")).json()["parameters"]["redis"]
        assert v1["consulted"] is False and v2["consulted"] is False
        scraped = (await client.get("/metrics")).text
        assert metric(scraped, "gateway_l2_consulted", model="iris", version="1") == 0
        assert metric(scraped, "gateway_redis_round_trip_seconds") > 0


@pytest.mark.anyio
@pytest.mark.parametrize("remote", ["auto", "off"])
async def test_every_redis_lookup_tells_the_rule_how_many_rows_redis_answered(
        compiled_store: Path, redis_server: Any, monkeypatch: pytest.MonkeyPatch,
        remote: str) -> None:
    """Through the lease script (``auto``) and through ``MGET`` (``off``): 8 new rows asked of
    one replica are 8 rows Redis did not answer; asked of another once stored, 8 it did."""
    reports: list[tuple[int, int]] = []
    real = Sharing.looked_up

    def looked_up(self: Sharing, runner: Any, rows: int, answered: int) -> None:
        reports.append((rows, answered))
        real(self, runner, rows, answered)

    monkeypatch.setattr(Sharing, "looked_up", looked_up)
    prefix = f"looked-up-{remote}"
    settings = {"redis_url": f"redis://{redis_server.host}:{redis_server.port}/0",
                "cache_prefix": prefix, "l2_min_call_us": 0, "coalesce_remote": remote}
    body = {"instances": [[4.0 + i / 10, 3.0, 1.5, 0.2] for i in range(8)]}
    r = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        async with gateway_client(compiled_store, **settings) as a:
            assert (await a.post("/v1/models/iris/predict", json=body)).status_code == 200
            assert reports == [(8, 0)]
            await wait_for_keys(r, prefix, count=8)
        async with gateway_client(compiled_store, **settings) as b:
            assert (await b.post("/v1/models/iris/predict", json=body)).status_code == 200
            assert reports == [(8, 0), (8, 8)]
    finally:
        await r.aclose()
