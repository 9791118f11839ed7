"""Model versions followed while serving: new, removed, bad and reconfigured versions, the
atomic swap, per-model settings, and the repository API with its admin token."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.dummy import DummyClassifier

from gateway import Settings, create_app
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES
from tests.support import probed_app, serve_with_state, wait_for, wait_thread_event

pytestmark = pytest.mark.anyio

ROW = [5.1, 3.5, 1.4, 0.2]  # setosa for the forest of v1
Q = "/v1/models/iris/predict"


def constant(label: str) -> DummyClassifier:
    return DummyClassifier(strategy="constant", constant=label).fit(
        np.zeros((3, 4)), ["setosa", "versicolor", "virginica"])


async def test_new_version_is_served_after_reload_and_requests_in_flight_keep_theirs(
        store_root: Path) -> None:
    async with probed_app(store_root, model_poll_s=0) as (client, probe, gw):
        probe.gate.clear()
        in_flight = asyncio.create_task(client.post(Q, json={"instances": [ROW]}))
        await wait_thread_event(probe.entered)
        ModelStore(store_root).register(constant("virginica"), "iris", features=IRIS_FEATURES,
                                        backend="sklearn")
        assert await gw.registry.reload()
        new = (await client.post(Q, json={"instances": [ROW]})).json()
        assert (new["version"], new["predictions"]) == ("2", ["virginica"])
        probe.gate.set()
        old = (await in_flight).json()
        assert (old["version"], old["predictions"]) == ("1", ["setosa"])
        pinned = (await client.post(Q, json={"instances": [ROW], "version": 1})).json()
        assert pinned["predictions"] == ["setosa"] and pinned["cache"] == ["l1"]
        assert not await gw.registry.reload()  # nothing changed since


async def test_concurrent_reloads_load_each_version_once(store_root: Path) -> None:
    loads: list[Path] = []

    def loader(path: Path) -> object:
        loads.append(path)
        return joblib.load(path)

    app = create_app(Settings(model_root=store_root, model_poll_s=0),
                     store=ModelStore(store_root, loader=loader))
    async with serve_with_state(app) as (_client, gw):
        assert len(loads) == 1
        ModelStore(store_root).register(constant("virginica"), "iris", features=IRIS_FEATURES,
                                        backend="sklearn")
        changed = await asyncio.gather(*(gw.registry.reload() for _ in range(10)))
        assert changed.count(True) == 1
        assert len(loads) == 2 and sorted(gw.models["iris"]) == [1, 2]


async def test_removed_version_stops_being_served(store_root: Path) -> None:
    ModelStore(store_root).register(constant("virginica"), "iris", features=IRIS_FEATURES,
                                    backend="sklearn")
    async with probed_app(store_root, model_poll_s=0) as (client, _, gw):
        assert sorted(gw.models["iris"]) == [1, 2]
        shutil.rmtree(store_root / "iris" / "2")
        await gw.registry.reload()
        assert sorted(gw.models["iris"]) == [1]
        r = await client.post(Q, json={"instances": [ROW], "version": 2})
        assert r.status_code == 404
        assert (await client.post(Q, json={"instances": [ROW]})).json()["version"] == "1"


async def test_bad_version_is_reported_and_never_replaces_a_good_one(store_root: Path) -> None:
    async with probed_app(store_root, model_poll_s=0) as (client, _, gw):
        ModelStore(store_root).register(constant("virginica"), "iris", features=IRIS_FEATURES,
                                        backend="sklearn")
        (store_root / "iris" / "2" / "model.joblib").write_bytes(b"tampered")
        await gw.registry.reload()
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "ready" and ready["models"] == {"iris": [1]}
        assert set(ready["failed"]) == {"iris:2"} and "/" not in ready["failed"]["iris:2"]
        assert (await client.post(Q, json={"instances": [ROW]})).json()["version"] == "1"
        metrics = (await client.get("/metrics")).text
        assert 'gateway_model_loads_total{model="iris",result="failed"} 1.0' in metrics


async def test_per_model_settings_apply_and_show(store_root: Path) -> None:
    ModelStore(store_root).configure("iris", 1, {"max_batch_size": 2, "cache_ttl_s": 30})
    async with probed_app(store_root, model_poll_s=0, max_batch_size=64) as (client, probe, gw):
        (version,) = (await client.get("/v1/models")).json()["models"][0]["versions"]
        assert version["settings"]["max_batch_size"] == 2
        assert version["settings"]["cache_ttl_s"] == 30
        rows = np.round(np.random.default_rng(3).uniform(1, 7, (6, 4)), 2).tolist()
        probe.gate.clear()
        first = asyncio.create_task(client.post(Q, json={"instances": [ROW]}))
        await wait_thread_event(probe.entered)
        rest = asyncio.create_task(client.post(Q, json={"instances": rows}))
        rt = gw.runtime("iris")
        assert rt.batcher is not None
        batcher = rt.batcher
        await wait_for(lambda: batcher.queued_rows == 6)
        probe.gate.set()
        await first
        assert (await rest).status_code == 200
        assert max(probe.batch_sizes) == 2
        meta = (await client.get("/v2/models/iris")).json()
        assert meta["parameters"]["settings"]["max_batch_size"] == 2


async def test_repository_api_needs_the_admin_token(store_root: Path) -> None:
    url = "/v2/repository/models/iris/unload"
    async with probed_app(store_root, model_poll_s=0) as (client, _, _):
        r = await client.post(url)
        assert r.status_code == 403 and "GATEWAY_ADMIN_TOKEN" in r.json()["error"]
    async with probed_app(store_root, model_poll_s=0, admin_token="s3cret") as (client, _, gw):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = await client.post(url, headers=headers)
            assert r.status_code == 401 and isinstance(r.json()["error"], str)
        assert "iris" in gw.models
        auth = {"authorization": "Bearer s3cret"}
        index = (await client.post("/v2/repository/index", headers=auth)).json()
        assert index == [{"name": "iris", "version": "1", "state": "READY"}]
        assert (await client.post(url, headers=auth)).status_code == 200
        assert (await client.post(Q, json={"instances": [ROW]})).status_code == 404
        assert (await client.post("/v2/repository/index", headers=auth)).json()[0][
            "state"] == "UNLOADED"
        await gw.registry.reload()  # the store still has it: unloaded stays unloaded
        assert "iris" not in gw.models
        r = await client.post("/v2/repository/models/iris/load", headers=auth)
        assert r.status_code == 200
        assert (await client.post(Q, json={"instances": [ROW]})).status_code == 200
        r = await client.post("/v2/repository/models/nope/load", headers=auth)
        assert r.status_code == 404 and isinstance(r.json()["error"], str)


async def test_polling_picks_up_a_new_version(store_root: Path) -> None:
    async with probed_app(store_root, model_poll_s=0.01) as (client, _, gw):
        changed = gw.registry.next_change()
        ModelStore(store_root).register(constant("virginica"), "iris", features=IRIS_FEATURES,
                                        backend="sklearn")
        await asyncio.wait_for(changed.wait(), timeout=30)
        assert sorted(gw.models["iris"]) == [1, 2]
        assert (await client.post(Q, json={"instances": [ROW]})).json()["version"] == "2"
