"""Cross-replica single-flight on real processes: three gateways (scikit-learn backend, so every
model consults Redis) sharing a redis-server of the test's own, bursts fired over pre-opened
connections, model calls counted from each replica's ``/metrics``."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.procs import GatewayProcess, RedisServer, gateway_process, redis_server
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES
from tests.gateway.remote_support import (
    NOTIFY_ENV,
    SLEEP_ENV,
    Reply,
    Sleepy,
    fire,
    predict_request,
)
from tests.hardening.procs import metric, metric_total

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPLICAS = 3


@dataclass
class Replicas:
    redis: RedisServer
    gateways: list[GatewayProcess]

    def total(self, name: str, **labels: str) -> float:
        return metric_total(self.gateways, name, **labels)


def _env(store: Path, url: str, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_MODEL_ROOT": str(store),
        "GATEWAY_REDIS_URL": url,
        "GATEWAY_CACHE_PREFIX": "remote",
        "GATEWAY_BACKEND": "sklearn",
        "GATEWAY_L2_MIN_CALL_US": "0",
        "GATEWAY_MODEL_POLL_S": "0",
        **extra,
    }


@pytest.fixture(scope="module")
def replicas(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    with redis_server(tmp_path_factory.mktemp("redis")) as rs:
        # A generous lease and Redis timeout: on a loaded 2-core machine a renewal or a reply
        # may come late, and these tests count calls exactly.
        env = _env(session_store, rs.url, GATEWAY_REMOTE_LEASE_MIN_MS="3000",
                   GATEWAY_REDIS_TIMEOUT_MS="500")
        with gateway_process(env) as a, gateway_process(env) as b, gateway_process(env) as c:
            yield Replicas(rs, [a, b, c])


def _answers_ok(replies: list[Reply], expected: list[Any]) -> list[str]:
    return [f"{i}: {r.status} {r.body[:120]!r}" for i, (r, e) in
            enumerate(zip(replies, expected, strict=True))
            if r.status != 200 or r.prediction() != e]


def test_identical_burst_over_replicas_costs_one_model_call(
        replicas: Replicas, random_rows: np.ndarray, iris_estimator: Any) -> None:
    row = random_rows[900].tolist()
    expected = iris_estimator.predict(random_rows[900:901]).tolist()[0]
    calls = replicas.total("gateway_model_calls_total")
    requests = [predict_request(replicas.gateways[i % REPLICAS].port, row) for i in range(200)]
    replies = asyncio.run(fire(requests))
    assert not _answers_ok(replies, [expected] * 200)
    assert replicas.total("gateway_model_calls_total") - calls == 1
    assert replicas.total("gateway_remote_leases_total", model="iris") >= 1


def test_distinct_rows_twice_over_two_replicas_are_computed_once(
        replicas: Replicas, random_rows: np.ndarray, iris_estimator: Any) -> None:
    rows = random_rows[700:900]
    expected = iris_estimator.predict(rows).tolist()
    before = replicas.total("gateway_model_rows_total")
    shared_before = _through_redis(replicas)
    ports = [gw.port for gw in replicas.gateways]
    requests = []
    for i, row in enumerate(rows.tolist()):
        requests.append(predict_request(ports[i % REPLICAS], row))
        requests.append(predict_request(ports[(i + 1) % REPLICAS], row))
    replies = asyncio.run(fire(requests))
    assert not _answers_ok(replies, [e for e in expected for _ in range(2)])
    assert replicas.total("gateway_model_rows_total") - before == 200
    # each row was answered to the other replica by Redis: a value there or one announced
    assert _through_redis(replicas) - shared_before >= 200


def _through_redis(replicas: Replicas) -> float:
    """Rows the replicas took from Redis: values it held (L2 hits, from the lease script),
    and values another replica announced while this one waited on its lease."""
    return (replicas.total("gateway_cache_lookups_total", tier="l2", result="hit")
            + replicas.total("gateway_remote_coalesced_total", model="iris"))


def test_redis_stopped_during_the_burst_every_request_is_answered(
        replicas: Replicas, random_rows: np.ndarray, iris_estimator: Any) -> None:
    rows = random_rows[600:650]
    expected = iris_estimator.predict(rows).tolist()
    ports = [gw.port for gw in replicas.gateways]
    first = [predict_request(ports[i % REPLICAS], row) for i, row in enumerate(rows.tolist())]
    second = [predict_request(ports[(i + 1) % REPLICAS], row)
              for i, row in enumerate(rows.tolist())]

    async def run() -> list[Reply]:
        burst = asyncio.ensure_future(fire(first * 2))
        replicas.redis.signal(signal.SIGSTOP)  # while the first burst is under way
        try:
            return [*await burst, *await fire(second)]
        finally:
            replicas.redis.signal(signal.SIGCONT)

    replies = asyncio.run(run())
    assert not _answers_ok(replies, expected * 3)
    assert replicas.total("gateway_remote_fallbacks_total", model="iris") > 0


@pytest.fixture
def sleepy_store(tmp_path: Path, iris_estimator: Any) -> Path:
    root = tmp_path / "models"
    ModelStore(root).register(Sleepy(iris_estimator), "iris", features=IRIS_FEATURES,
                              backend="sklearn")
    return root


CALL_S = 1.0
LEASE_MS = 1000  # renewed every third: a loaded machine's stall of up to ~0.6 s costs no lease


def test_lease_holder_killed_while_computing(
        sleepy_store: Path, tmp_path: Path, random_rows: np.ndarray, iris_estimator: Any
) -> None:
    row = random_rows[950].tolist()
    expected = iris_estimator.predict(random_rows[950:951]).tolist()[0]
    sock = str(tmp_path / "calls.sock")
    env = _env(sleepy_store, "", GATEWAY_REMOTE_LEASE_MIN_MS=str(LEASE_MS),
               **{SLEEP_ENV: str(CALL_S), NOTIFY_ENV: sock})
    with redis_server(tmp_path) as rs:
        env["GATEWAY_REDIS_URL"] = rs.url
        with gateway_process(env) as a, gateway_process(env) as b, gateway_process(env) as c:
            gateways = [a, b, c]
            by_pid = {gw.proc.pid: gw for gw in gateways}

            async def run() -> tuple[GatewayProcess, list[Reply], float]:
                calls: asyncio.Queue[int] = asyncio.Queue()

                async def on_call(reader: asyncio.StreamReader,
                                  writer: asyncio.StreamWriter) -> None:
                    calls.put_nowait(int(await reader.readline()))
                    writer.close()

                server = await asyncio.start_unix_server(on_call, sock)
                async with server:
                    burst = asyncio.ensure_future(fire(
                        [predict_request(gateways[i % REPLICAS].port, row) for i in range(30)]))
                    holder = by_pid[await asyncio.wait_for(calls.get(), 30)]
                    os.kill(holder.proc.pid, signal.SIGKILL)  # one of ours, by its PID
                    killed_at = time.monotonic()
                    replies = await burst
                    return holder, replies, time.monotonic() - killed_at

            holder, replies, elapsed = asyncio.run(run())
            holder.proc.wait()
            survivors = [gw for gw in gateways if gw is not holder]
            mine = [r for i, r in enumerate(replies) if gateways[i % REPLICAS] is not holder]
            assert len(mine) == 20
            assert not _answers_ok(mine, [expected] * 20)
            # the lease ran out, then one survivor computed (one call) while the other waited
            assert elapsed < LEASE_MS / 1000 + CALL_S + 5.0
            expiries = sum(metric(gw.metrics(), "gateway_remote_lease_expiries_total")
                           for gw in survivors)
            assert expiries >= 1
            calls = sum(metric(gw.metrics(), "gateway_model_calls_total") for gw in survivors)
            assert calls == 1
