"""End to end: the gateway as a real uvicorn process, a real redis-server, HTTP over loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from model_store.demo import IRIS_FEATURES
from tests.support import uvicorn_process

pytestmark = pytest.mark.e2e


def q(row: Any) -> dict[str, float]:
    return {n: float(v) for n, v in zip(IRIS_FEATURES, row, strict=True)}


def wait_for_key(r: redis.Redis, pattern: str, count: int = 1) -> None:
    """Wait (bounded) until the gateway's background write has reached Redis."""
    for _ in range(100_000):
        if len(r.keys(pattern)) >= count:
            return
    raise AssertionError(f"no key {pattern} in redis")


def test_answers_equal_sklearn_for_iris_and_random_rows(
    session_store: Path, iris_rows: np.ndarray, random_rows: np.ndarray, iris_estimator: Any
) -> None:
    with uvicorn_process({"GATEWAY_MODEL_ROOT": str(session_store)}) as base, \
            httpx.Client(base_url=base) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        rows = np.vstack([iris_rows, random_rows])
        expected = iris_estimator.predict(rows).tolist()
        got: list[Any] = []
        for chunk in (rows[:600], rows[600:]):
            r = client.post("/v1/models/iris/predict", json={"instances": chunk.tolist()})
            assert r.status_code == 200
            got += r.json()["predictions"]
        assert got == expected
        for row, label in zip(rows[::25], expected[::25], strict=True):
            r = client.get("/predict", params=q(row))
            assert r.json() == {"prediction": label} and r.headers["x-cache"] == "l1"
        bad = client.get("/predict", params={**q(rows[0]), "sepal_width": "nan"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "non_finite"
        huge = client.post("/v1/models/iris/predict", content=b"[" * (2 << 20))
        assert huge.status_code == 413
        assert client.get("/readyz").status_code == 200


def test_two_gateways_share_redis_and_survive_its_loss(
    session_store: Path, redis_fault_server: Any, random_rows: np.ndarray
) -> None:
    r = redis.Redis(host=redis_fault_server.host, port=redis_fault_server.port)
    env = {
        "GATEWAY_MODEL_ROOT": str(session_store),
        "GATEWAY_REDIS_URL": f"redis://{redis_fault_server.host}:{redis_fault_server.port}/0",
        "GATEWAY_CACHE_PREFIX": "e2e",
        "GATEWAY_BREAKER_FAILURES": "2",
        "GATEWAY_BREAKER_COOLDOWN_S": "0.05",
        "GATEWAY_L2_MIN_CALL_US": "0",  # the forest answers faster than Redis: ask it anyway
    }
    rows = iter(random_rows[500:])
    with uvicorn_process(env) as base_a, uvicorn_process(env) as base_b, \
            httpx.Client(base_url=base_a) as a, httpx.Client(base_url=base_b) as b:
        row = next(rows)
        first = a.get("/predict", params=q(row))
        assert first.headers["x-cache"] == "miss"
        wait_for_key(r, "e2e:iris:*")
        second = b.get("/predict", params=q(row))
        assert second.headers["x-cache"] == "l2" and second.json() == first.json()
        assert a.get("/predict", params=q(row)).headers["x-cache"] == "l1"

        redis_fault_server.stop()
        try:
            for client in (a, b):
                for _ in range(5):
                    assert client.get("/predict", params=q(next(rows))).status_code == 200
                ready = client.get("/readyz")
                assert ready.status_code == 200
                assert ready.json()["cache"]["l2"] == "degraded"
        finally:
            redis_fault_server.start()

        # No restart: each gateway's breaker probes Redis again once its cooldown is over.
        for client in (a, b):
            for _ in range(10_000):
                client.get("/predict", params=q(next(rows)))
                if client.get("/readyz").json()["cache"]["l2"] == "ok":
                    break
            assert client.get("/readyz").json()["cache"]["l2"] == "ok"
        r.flushdb()  # this test's own redis-server, never the machine's
        row = next(rows)
        assert a.get("/predict", params=q(row)).headers["x-cache"] == "miss"
        wait_for_key(r, "e2e:iris:*")
        assert b.get("/predict", params=q(row)).headers["x-cache"] == "l2"
