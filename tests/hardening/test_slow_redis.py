"""A Redis a few round trips away stays useful: L2 hits at 15 ms and 30 ms one-way latency.

The gateway reaches a redis-server of the test's own through ``DelayProxy``; its L1 keeps an
entry for 1 ms, so repeated rows are answered from Redis whenever Redis answers in time. Every
connection is opened through the delay, from a cold start. With ``GATEWAY_REDIS_TIMEOUT_MS=100``
(over the 60 ms round trip at 30 ms one-way) hits go on in the second half of each phase too:
Redis is never given up for good. (Before the Redis client kept connects and late replies apart
from the call timeout, each timeout closed the connection and no new one could open within
the timeout: 0 hits at 15 ms, also with a 150 ms timeout at 30 ms.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.procs import gateway_process, redis_server
from model_store.demo import IRIS_FEATURES
from tests.hardening.procs import DelayProxy, metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TIMEOUT_MS = "150"
CLIENTS = 4
REQUESTS_PER_CLIENT = 30


async def _load(base: str, rows: np.ndarray, expected: list[str]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        async def worker(k: int) -> None:
            for i in range(REQUESTS_PER_CLIENT):
                j = (k * 7 + i) % len(rows)
                r = await client.get("/predict",
                                     params=dict(zip(IRIS_FEATURES, map(float, rows[j]),
                                                     strict=True)))
                assert r.status_code == 200 and r.json() == {"prediction": expected[j]}
        await asyncio.gather(*(worker(k) for k in range(CLIENTS)))


def test_l2_hits_go_on_at_15_and_30_ms_one_way(
    session_store: Path, tmp_path: Path, random_rows: np.ndarray, iris_estimator: object,
) -> None:
    rows = random_rows[:40]
    expected = iris_estimator.predict(rows).tolist()  # type: ignore[attr-defined]
    with redis_server(tmp_path) as rs, DelayProxy(rs.port, delay_s=0.015) as proxy:
        env = {
            "GATEWAY_MODEL_ROOT": str(session_store),
            "GATEWAY_REDIS_URL": proxy.url,
            "GATEWAY_REDIS_TIMEOUT_MS": TIMEOUT_MS,
            "GATEWAY_L2_MIN_CALL_US": "0",
            "GATEWAY_L1_TTL_S": "0.001",
            "GATEWAY_BACKEND": "sklearn",
            "GATEWAY_BREAKER_COOLDOWN_S": "0.5",
        }
        with gateway_process(env) as gw:
            figures = []
            for delay_ms in (15, 30):
                proxy.delay_s = delay_ms / 1000
                for half in ("first", "second"):
                    before = gw.metrics()
                    asyncio.run(_load(gw.base, rows, expected))
                    after = gw.metrics()

                    def delta(result: str, a: str = after, b: str = before) -> int:
                        name = "gateway_cache_lookups_total"
                        return round(metric(a, name, tier="l2", result=result)
                                     - metric(b, name, tier="l2", result=result))

                    figures.append((delay_ms, half, delta("hit"), delta("miss"), delta("error")))
            for delay_ms, half, hits, misses, errors in figures:
                print(f"one-way {delay_ms} ms, {half} half ({CLIENTS * REQUESTS_PER_CLIENT} "
                      f"requests, GATEWAY_REDIS_TIMEOUT_MS={TIMEOUT_MS}): l2 hits {hits}, "
                      f"misses {misses}, skipped or failed {errors}")
            assert all(hits > 0 for _, _, hits, _, _ in figures), figures
