"""The gateway on a real 3-master Redis Cluster (``redis+cluster://``): L2 hits across replicas,
cross-replica coalescing over keys in many slots, and a master killed mid-load (degraded, never
failed). Three gateways, scikit-learn backend, counted from each replica's ``/metrics``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.procs import GatewayProcess, RedisCluster, gateway_process, redis_cluster
from tests.gateway.remote_support import Reply, fire, predict_request
from tests.hardening.procs import metric, metric_total

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPLICAS = 3


@dataclass
class Setup:
    cluster: RedisCluster
    gateways: list[GatewayProcess]

    def total(self, name: str, **labels: str) -> float:
        return metric_total(self.gateways, name, **labels)


@pytest.fixture(scope="module")
def setup(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        env = {
            "GATEWAY_MODEL_ROOT": str(session_store),
            "GATEWAY_REDIS_URL": cluster.url,
            "GATEWAY_CACHE_PREFIX": "cluster",
            "GATEWAY_BACKEND": "sklearn",
            "GATEWAY_L2_MIN_CALL_US": "0",
            "GATEWAY_MODEL_POLL_S": "0",
            # Counted exactly: no early lease expiry, no Redis call given up on a loaded machine
            "GATEWAY_REMOTE_LEASE_MIN_MS": "3000",
            "GATEWAY_REDIS_TIMEOUT_MS": "500",
        }
        with gateway_process(env) as a, gateway_process(env) as b, gateway_process(env) as c:
            yield Setup(cluster, [a, b, c])


def _wrong(replies: list[Reply], expected: list[Any]) -> list[str]:
    return [f"{i}: {r.status} {r.body[:120]!r}" for i, (r, e) in
            enumerate(zip(replies, expected, strict=True))
            if r.status != 200 or r.prediction() != e]


def test_ready_on_the_cluster(setup: Setup) -> None:
    for gw in setup.gateways:
        assert "remote=on" in "".join(gw.log)


def test_l2_hits_across_replicas(setup: Setup, random_rows: np.ndarray,
                                 iris_estimator: Any) -> None:
    rows = random_rows[100:160]
    expected = iris_estimator.predict(rows).tolist()
    a, b, _ = setup.gateways
    first = asyncio.run(fire([predict_request(a.port, r) for r in rows.tolist()]))
    assert not _wrong(first, expected)
    hits = b.l2_hits()
    calls = metric(b.metrics(), "gateway_model_calls_total")
    # the rows went to Redis before A answered (the lease holder stores them): all are hits
    second = asyncio.run(fire([predict_request(b.port, r) for r in rows.tolist()]))
    assert not _wrong(second, expected)
    assert b.l2_hits() - hits == len(rows)
    assert metric(b.metrics(), "gateway_model_calls_total") == calls


def test_identical_burst_over_replicas_costs_one_model_call(
        setup: Setup, random_rows: np.ndarray, iris_estimator: Any) -> None:
    row = random_rows[160].tolist()
    expected = iris_estimator.predict(random_rows[160:161]).tolist()[0]
    calls = setup.total("gateway_model_calls_total")
    replies = asyncio.run(fire([predict_request(setup.gateways[i % REPLICAS].port, row)
                                for i in range(150)]))
    assert not _wrong(replies, [expected] * 150)
    assert setup.total("gateway_model_calls_total") - calls == 1


def test_distinct_rows_in_many_slots_are_computed_once(
        setup: Setup, random_rows: np.ndarray, iris_estimator: Any) -> None:
    rows = random_rows[200:300]
    expected = iris_estimator.predict(rows).tolist()
    ports = [gw.port for gw in setup.gateways]
    before = setup.total("gateway_model_rows_total")
    requests = []
    for i, row in enumerate(rows.tolist()):
        requests += [predict_request(ports[i % REPLICAS], row),
                     predict_request(ports[(i + 1) % REPLICAS], row)]
    replies = asyncio.run(fire(requests))
    assert not _wrong(replies, [e for e in expected for _ in range(2)])
    assert setup.total("gateway_model_rows_total") - before == len(rows)


def test_master_killed_mid_load_degrades_without_failing(
        setup: Setup, random_rows: np.ndarray, iris_estimator: Any) -> None:
    rows = random_rows[300:420]
    expected = iris_estimator.predict(rows).tolist()
    ports = [gw.port for gw in setup.gateways]
    errors = setup.total("gateway_redis_errors_total")

    async def run() -> list[Reply]:
        first = [predict_request(ports[i % REPLICAS], r) for i, r in enumerate(rows[:60].tolist())]
        second = [predict_request(ports[i % REPLICAS], r)
                  for i, r in enumerate(rows[60:].tolist())]
        burst = asyncio.ensure_future(fire(first))
        replies = await burst
        setup.cluster.kill(2)  # mid-load: between two bursts, with lookups still coming
        return [*replies, *await fire(second), *await fire(second)]

    replies = asyncio.run(run())
    assert not _wrong(replies, [*expected[:60], *expected[60:], *expected[60:]])
    assert setup.total("gateway_redis_errors_total") > errors  # degraded, not failed
