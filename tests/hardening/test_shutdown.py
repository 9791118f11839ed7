"""SIGTERM with requests under way: every one is answered (200 or 503 ``shutting down``,
never 500 or a dropped connection) within one grace period, and the process exits with 0.

The scenario of the original report: the scikit-learn backend with batches of one row, four
POSTs of 1,024 distinct rows (about 12 s of model calls: the forest sits behind a scaler, a
pipeline the store's forest fast path leaves to scikit-learn, about 3 ms a call), then SIGTERM.
Before the gateway's own server, the unfinished requests were cancelled at uvicorn's fixed 10 s
cutoff and got 500.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.procs import GatewayProcess, gateway_process
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES, iris_data
from tests.hardening.procs import metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GRACE_S = 1.0


@pytest.fixture(scope="module")
def slow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris as a scaler and a 100-tree forest: about 3 ms per call, whatever the rows."""
    root = tmp_path_factory.mktemp("slow")
    x, y = iris_data()
    model = make_pipeline(StandardScaler(), RandomForestClassifier(random_state=0)).fit(x, y)
    ModelStore(root).register(model, "iris", features=IRIS_FEATURES, backend="sklearn")
    return root


async def _run_until_sigterm(gw: GatewayProcess, workers: int) -> list[httpx.Response]:
    rng = np.random.default_rng(11)
    clients = [httpx.AsyncClient(base_url=gw.base, timeout=60) for _ in range(4)]
    try:
        for c in clients:  # each client's one connection is accepted before its POST
            assert (await c.get("/healthz")).status_code == 200
        posts = [
            asyncio.ensure_future(c.post("/v1/models/iris/predict", json={
                "instances": np.round(rng.uniform([4, 2, 1, 0], [8, 4.5, 7, 2.5],
                                                  size=(1024, 4)), 3).tolist()}))
            for c in clients
        ]
        # Wait (bounded) until the model is running on them: with one worker, all four are
        # in flight (plus this /metrics request itself); with more, some worker is busy.
        async with httpx.AsyncClient(base_url=gw.base, timeout=10,
                                     limits=httpx.Limits(max_keepalive_connections=0)) as probe:
            for _ in range(2000):
                text = (await probe.get("/metrics")).text
                busy = metric(text, "gateway_requests_in_flight") - 1
                if metric(text, "gateway_model_calls_total") > 0 and busy >= 4 / workers:
                    break
            else:
                raise AssertionError("the posts never reached the model")
        gw.proc.send_signal(15)
        return list(await asyncio.gather(*posts))
    finally:
        for c in clients:
            await c.aclose()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_answers_every_request_and_exits_0(slow_store: Path, workers: int) -> None:
    env = {
        "GATEWAY_MODEL_ROOT": str(slow_store),
        "GATEWAY_BACKEND": "sklearn",
        "GATEWAY_MAX_BATCH_SIZE": "1",
        "GATEWAY_MAX_QUEUE_ROWS": "8192",
        "GATEWAY_SHUTDOWN_GRACE_S": str(GRACE_S),
    }
    with gateway_process(env, workers=workers) as gw:
        start = time.monotonic()
        responses = asyncio.run(_run_until_sigterm(gw, workers))
        status = gw.proc.wait(timeout=30)
        took = time.monotonic() - start
        statuses = [r.status_code for r in responses]
        print(f"workers={workers}: answers {statuses}, exit status {status}, "
              f"{took:.1f} s from the posts to exit")
        for r in responses:
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                error = r.json()["error"]
                assert "shutting down" in error["message"].lower(), r.text
                assert r.headers.get("retry-after")
        assert 503 in statuses  # 12 s of work cannot finish within a 1 s grace period
        assert status == 0, "".join(gw.log)
        assert not any("Exception in ASGI application" in line for line in gw.log), gw.log


def test_requests_without_a_batcher_are_answered_503_too(slow_store: Path) -> None:
    """With ``GATEWAY_BATCH=off`` rows wait in worker threads, where the drain cannot reach
    them: the server cancels what is left after the grace period and answers 503 itself."""
    env = {
        "GATEWAY_MODEL_ROOT": str(slow_store),
        "GATEWAY_BACKEND": "sklearn",
        "GATEWAY_BATCH": "off",
        "GATEWAY_SHUTDOWN_GRACE_S": str(GRACE_S),
    }
    with gateway_process(env) as gw:
        responses = asyncio.run(_run_until_sigterm(gw, 1))
        assert gw.proc.wait(timeout=30) == 0
        for r in responses:
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "shutting_down"
            assert r.headers["connection"] == "close"
        assert any("still running after the 1.0 s grace period" in line for line in gw.log)
        assert not any("Exception in ASGI application" in line for line in gw.log), gw.log
