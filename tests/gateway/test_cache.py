"""Cache tiers: L1 unit behaviour, and L2 against a real redis-server of the test session."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from gateway import Settings, create_app
from gateway.cache import L1Cache
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES
from tests.support import probed_app, wait_for

pytestmark = pytest.mark.anyio


def test_l1_expires_by_age_and_evicts_least_recently_used() -> None:
    now = [0.0]
    l1 = L1Cache(2, 10.0, clock=lambda: now[0])
    l1.put("a", 1)
    l1.put("b", 2)
    assert l1.get("a") == 1  # a is now the most recently used
    l1.put("c", 3)
    assert (l1.get("a"), l1.get("b"), l1.get("c")) == (1, None, 3)
    now[0] = 10.5
    assert l1.get("a") is None and l1.get("c") is None and len(l1) == 0


def test_l1_entries_leave_the_garbage_collector_nothing_to_scan() -> None:
    """Churning a full L1 (each new entry evicting an old one) adds no object the collector
    tracks: nothing builds up for the next young collection to scan."""
    l1 = L1Cache(1_000, 10.0)
    l1.put_many([f"old{i}" for i in range(1_000)], [b"v%d" % i for i in range(1_000)])
    keys = [f"new{i}" for i in range(10_000)]
    values = [b"v%d" % i for i in range(10_000)]
    gc.disable()
    try:
        gc.collect()
        before = len(gc.get_objects(generation=0))
        l1.put_many(keys, values)
        for key in keys[-100:]:
            l1.put(key, b"again")
        assert l1.get_many(keys[-3:]) == [b"again"] * 3
        assert len(gc.get_objects(generation=0)) - before < 50
    finally:
        gc.enable()
    assert len(l1) == 1_000 and l1.get("old0") is None


def url(proc: Any) -> str:
    return f"redis://{proc.host}:{proc.port}/0"


def q(row: list[float] | np.ndarray) -> str:
    return "/predict?" + "&".join(f"{n}={v}" for n, v in zip(IRIS_FEATURES, row, strict=True))


def calls_of(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def lookups(r: redis.Redis) -> tuple[int, int]:
    """Calls so far of MGET and of EVALSHA (the lease script)."""
    return calls_of(r, "mget"), calls_of(r, "evalsha")


# Without cross-replica coordination a block's misses are looked up with one MGET; with it,
# the lease script is the lookup and no MGET precedes it.
LOOKUP = pytest.mark.parametrize("remote, lookup", [("off", (1, 0)), ("auto", (0, 1))])


@asynccontextmanager
async def gateway_on(root: Path, redis_url: str, **kw: Any) -> AsyncIterator[Any]:
    async with probed_app(root, redis_url=redis_url, **kw) as (client, probe, gw):
        yield client, probe, gw


async def test_second_instance_answers_from_l2_without_its_model(
    session_store: Path, redis_server: Any, random_rows: np.ndarray
) -> None:
    row = random_rows[10]
    async with gateway_on(session_store, url(redis_server)) as (a, probe_a, gw_a):
        r = await a.get(q(row))
        assert r.headers["x-cache"] == "miss"
        assert gw_a.l2 is not None
        await gw_a.l2.flush_writes()
        async with gateway_on(session_store, url(redis_server)) as (b, probe_b, _):
            r2 = await b.get(q(row))
            assert r2.headers["x-cache"] == "l2" and r2.json() == r.json()
            assert (await b.get(q(row))).headers["x-cache"] == "l1"
            assert probe_b.calls == 0
            ready = (await b.get("/readyz")).json()
            assert ready["cache"] == {"l1": "ok", "l2": "ok"}
        assert (await a.get(q(row))).headers["x-cache"] == "l1"
        assert probe_a.calls == 1


async def test_entries_carry_the_redis_ttl_and_expire_with_it(
    session_store: Path, redis_server: Any, random_rows: np.ndarray
) -> None:
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    row = random_rows[11]
    async with gateway_on(session_store, url(redis_server), cache_ttl_s=120,
                          cache_prefix="ttl") as (a, _, gw):
        await a.get(q(row))
        assert gw.l2 is not None
        await gw.l2.flush_writes()
    (key,) = r.keys("ttl:iris:*")
    assert 0 < r.ttl(key) <= 120
    assert r.expire(key, 0)  # what the TTL does when it runs out
    async with gateway_on(session_store, url(redis_server), cache_prefix="ttl") as (b, pb, _):
        assert (await b.get(q(row))).headers["x-cache"] == "miss"
        assert pb.calls == 1


@LOOKUP
async def test_multirow_request_makes_one_lookup_and_computes_only_missing(
    session_store: Path, redis_server: Any, random_rows: np.ndarray, iris_estimator: Any,
    remote: str, lookup: tuple[int, int]
) -> None:
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    rows = random_rows[20:28]
    prefix = f"lookup-{remote}"
    async with gateway_on(session_store, url(redis_server), cache_prefix=prefix) as (a, _, gw):
        await a.post("/v1/models/iris/predict", json={"instances": rows[:4].tolist()})
        assert gw.l2 is not None
        await gw.l2.flush_writes()
    async with gateway_on(session_store, url(redis_server), cache_prefix=prefix,
                          coalesce_remote=remote) as (b, probe, gw_b):
        assert (gw_b.remote is not None) == (remote == "auto")
        before = lookups(r)
        resp = (await b.post("/v1/models/iris/predict",
                             json={"instances": rows.tolist()})).json()
        mgets, scripts = (b - a for a, b in zip(before, lookups(r), strict=True))
        assert mgets == lookup[0]
        assert (scripts > 0) == bool(lookup[1])
        assert resp["cache"] == ["l2"] * 4 + ["miss"] * 4
        assert resp["predictions"] == iris_estimator.predict(rows).tolist()
        assert probe.rows == 4 and probe.calls == 1


@LOOKUP
async def test_lookups_of_concurrent_requests_merge_into_one(
    session_store: Path, redis_server: Any, random_rows: np.ndarray, remote: str,
    lookup: tuple[int, int]
) -> None:
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    async with gateway_on(session_store, url(redis_server), cache_prefix=f"merge-{remote}",
                          coalesce_remote=remote) as (a, probe, gw):
        before = lookups(r)
        probe.gate.clear()  # no request finishes before all 20 have looked Redis up
        tasks = [asyncio.create_task(a.get(q(row))) for row in random_rows[30:50]]
        batcher = gw.runtime("iris").batcher
        assert batcher is not None
        await wait_for(lambda: probe.rows + batcher.queued_rows == 20)
        probe.gate.set()
        await asyncio.gather(*tasks)
        mgets, scripts = (b - a for a, b in zip(before, lookups(r), strict=True))
        assert mgets <= 2 * lookup[0]
        assert scripts <= 4 * lookup[1]  # per tick: one to look up and lease, one to store


async def test_new_version_never_serves_an_old_answer(
    store_root: Path, redis_server: Any
) -> None:
    from sklearn.dummy import DummyClassifier

    row = [5.1, 3.5, 1.4, 0.2]
    async with gateway_on(store_root, url(redis_server), cache_prefix="ver") as (a, _, gw):
        assert (await a.get(q(row))).json() == {"prediction": "setosa"}
        assert gw.l2 is not None
        await gw.l2.flush_writes()
    dummy = DummyClassifier(strategy="constant", constant="virginica").fit(
        np.zeros((3, 4)), ["setosa", "versicolor", "virginica"])
    ModelStore(store_root).register(dummy, "iris", features=IRIS_FEATURES)
    async with gateway_on(store_root, url(redis_server), cache_prefix="ver") as (b, _, _):
        r = await b.get(q(row))
        assert r.json() == {"prediction": "virginica"} and r.headers["x-cache"] == "miss"
        v1 = (await b.post("/v1/models/iris/predict",
                           json={"instances": [row], "version": 1})).json()
        assert v1["predictions"] == ["setosa"] and v1["cache"] == ["l2"]


async def test_redis_down_serves_from_model_then_recovers(
    session_store: Path, redis_fault_server: Any, random_rows: np.ndarray
) -> None:
    """Stop redis-server mid-run: answers stay 200, the circuit opens; start it again: L2 is
    used again without a restart."""
    settings = {"breaker_failures": 2, "breaker_cooldown_s": 0.05, "redis_timeout_ms": 200}
    rows = iter(random_rows[100:])
    async with gateway_on(session_store, url(redis_fault_server), **settings) as (a, _, gw):
        assert (await a.get(q(next(rows)))).status_code == 200
        redis_fault_server.stop()
        try:
            statuses = [(await a.get(q(next(rows)))).status_code for _ in range(10)]
            assert statuses == [200] * 10
            ready = await a.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["cache"] == {"l1": "ok", "l2": "degraded"}
            metrics = (await a.get("/metrics")).text
            assert "gateway_circuit_open 1.0" in metrics
        finally:
            redis_fault_server.start()
        # Recovery: the breaker lets a probe through once its cooldown has passed.
        for _ in range(10_000):
            if (await a.get(q(next(rows)))).status_code == 200 and gw.l2.status == "ok":
                break
        assert gw.l2 is not None and gw.l2.status == "ok"
        row = next(rows)
        await a.get(q(row))
        await gw.l2.flush_writes()
        async with gateway_on(session_store, url(redis_fault_server)) as (b, probe_b, _):
            assert (await b.get(q(row))).headers["x-cache"] == "l2"
            assert probe_b.calls == 0


async def test_redis_down_at_startup_does_not_stop_startup(session_store: Path) -> None:
    from bench.procs import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with gateway_on(session_store, dead) as (a, _, _):
        assert (await a.get(q([5.0, 3.4, 1.5, 0.2]))).status_code == 200
        ready = (await a.get("/readyz")).json()
        assert ready["status"] == "ready"
        assert ready["cache"]["l2"] == "degraded"  # never answered since startup


async def test_cache_off_disables_both_tiers(session_store: Path, redis_server: Any) -> None:
    async with gateway_on(session_store, url(redis_server), cache="off") as (a, probe, _):
        for _ in range(2):
            assert (await a.get(q([5.0, 3.0, 1.6, 0.2]))).headers["x-cache"] == "miss"
        assert (await a.get("/readyz")).json()["cache"] == {"l1": "off", "l2": "off"}
        assert probe.calls == 2




async def test_redis_is_skipped_for_a_model_cheaper_than_a_round_trip(
    compiled_store: Path, redis_server: Any, random_rows: np.ndarray
) -> None:
    from tests.support import serve_with_state

    app = create_app(Settings(model_root=compiled_store, redis_url=url(redis_server),
                              cache_prefix="cheap", execution="inline",
                              l2_min_call_us=10_000))  # far above the model's microseconds
    async with serve_with_state(app) as (client, gw):
        rt = gw.runtime("iris")
        for row in random_rows[200:220]:
            assert (await client.get(q(row))).status_code == 200
        assert rt.executor.measured and rt.executor.per_call_s < 10e-3
        assert gw.l2 is not None
        await gw.l2.flush_writes()
        r = redis.Redis(host=redis_server.host, port=redis_server.port)
        written = len(r.keys("cheap:iris:*"))
        assert 0 < written < 20  # only while the model's cost was not yet measured
        for row in random_rows[220:240]:
            assert (await client.get(q(row))).headers["x-cache"] == "miss"
        await gw.l2.flush_writes()
        assert len(r.keys("cheap:iris:*")) == written
        assert (await client.get(q(random_rows[230]))).headers["x-cache"] == "l1"


async def test_unix_socket_url(session_store: Path, redis_server: Any,
                               random_rows: np.ndarray) -> None:
    row = random_rows[300]
    unix = f"unix://{redis_server.unixsocket}"
    async with gateway_on(session_store, unix, cache_prefix="unix") as (a, _, gw):
        await a.get(q(row))
        assert gw.l2 is not None
        await gw.l2.flush_writes()
    async with gateway_on(session_store, unix, cache_prefix="unix") as (b, probe, _):
        assert (await b.get(q(row))).headers["x-cache"] == "l2"
        assert probe.calls == 0


async def test_a_write_the_client_fails_on_unexpectedly_is_dropped_and_writing_goes_on(
    session_store: Path, redis_server: Any, random_rows: np.ndarray,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = random_rows[310], random_rows[311]
    async with gateway_on(session_store, url(redis_server), cache_prefix="defect",
                          l2_min_call_us=0, coalesce_remote="off") as (a, _, gw):
        assert gw.l2 is not None
        pipeline = gw.l2.client.pipeline

        def broken_once(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.setattr(gw.l2.client, "pipeline", pipeline)
            raise RuntimeError("a defect of the client")

        monkeypatch.setattr(gw.l2.client, "pipeline", broken_once)
        await a.get(q(first))
        await gw.l2.flush_writes()  # returns: the failed chunk is dropped, not pending
        assert gw.l2.client.pipeline is pipeline  # the broken call was made
        await a.get(q(second))
        await gw.l2.flush_writes()
        metrics = (await a.get("/metrics")).text
        assert "gateway_l2_writes_dropped_total 1.0" in metrics
    async with gateway_on(session_store, url(redis_server), cache_prefix="defect") as (b, _, _):
        assert (await b.get(q(first))).headers["x-cache"] == "miss"
        assert (await b.get(q(second))).headers["x-cache"] == "l2"
