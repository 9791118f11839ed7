"""Redis faults under a bounded mixed load against two real gateways sharing one Redis.

The gateways (scikit-learn backend, so every lookup may go to Redis; ``GATEWAY_L2_MIN_CALL_US=0``
and a 0.2 s L1 lifetime so that many do) reach a redis-server of the test's own through a
delaying proxy. Six clients send ``GET /predict``, ``/v1`` (4 rows, probabilities) and V2
(3 rows, both outputs) requests over 200 rows while Redis is killed three times and restarted,
stopped for 5 s, and slowed to 200 ms and then 15 ms one-way. Every answer must be 200 and
equal the estimator's own (labels and probabilities, exactly).

Redis must be in use where the scenario says so, counted from the gateways' ``/metrics``
(``gateway_cache_lookups_total{tier="l2",result="hit"}``): before each fault, after it (after
each restart), and while a 15 ms one-way link (a 30 ms round trip, under the 50 ms call
timeout) slows it. Each such check keeps the load running until the gateways have answered
``MIN_L2_HITS`` more rows from Redis, failing only if that takes longer than ``L2_WAIT_S``: a
bound on progress, not a timing. The figures are printed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench.procs import GatewayProcess, RedisServer, gateway_process, redis_server
from model_store.demo import IRIS_FEATURES
from tests.hardening.procs import DelayProxy, metric_total

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLIENTS = 6
REDIS_TIMEOUT_MS = 50  # the gateways' bound on a Redis call (the default)
MIN_L2_HITS = 10  # rows answered from Redis that show it is in use
L2_WAIT_S = 30.0  # the most load a check may take to see them (on a loaded machine: seconds)


@dataclass
class Tally:
    """What the load saw; ``reached`` lets a fault wait for progress instead of time."""

    requests: int = 0
    failures: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    max_latency_s: float = 0.0
    l2_checks: list[str] = field(default_factory=list)  # "when hits" of each passed check
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, latency_s: float) -> None:
        self.requests += 1
        self.max_latency_s = max(self.max_latency_s, latency_s)
        self._progress.set()

    async def more(self, n: int) -> None:
        """Wait until ``n`` more requests have been answered."""
        target = self.requests + n
        while self.requests < target:
            self._progress.clear()
            await self._progress.wait()


@dataclass
class Setup:
    redis: RedisServer
    proxy: DelayProxy
    gateways: list[GatewayProcess]
    rows: np.ndarray
    labels: list[str]
    probs: list[list[float]]

    def l2_hits(self) -> float:
        """Rows the gateways have answered from Redis so far."""
        return metric_total(self.gateways, "gateway_cache_lookups_total", tier="l2",
                            result="hit")

    async def redis_used(self, tally: Tally, when: str) -> float:
        """Keep the load running until ``MIN_L2_HITS`` more rows are answered from Redis; the
        hits counted. AssertionError if ``L2_WAIT_S`` pass first."""
        start = hits = await asyncio.to_thread(self.l2_hits)
        try:
            async with asyncio.timeout(L2_WAIT_S):
                while hits - start < MIN_L2_HITS:
                    await tally.more(10)
                    hits = await asyncio.to_thread(self.l2_hits)
        except TimeoutError:
            raise AssertionError(f"Redis not in use {when}: {hits - start:.0f} l2 hits in "
                                 f"{L2_WAIT_S:.0f} s of load ({tally.requests} requests)") from None
        tally.l2_checks.append(f"{when} {hits - start:.0f}")
        return hits - start


@pytest.fixture(scope="module")
def setup(session_store: Path, tmp_path_factory: pytest.TempPathFactory,
          random_rows: np.ndarray, iris_estimator: Any) -> Iterator[Setup]:
    rows = random_rows[200:400]
    with redis_server(tmp_path_factory.mktemp("redis")) as rs, DelayProxy(rs.port) as proxy:
        env = {
            "GATEWAY_MODEL_ROOT": str(session_store),
            "GATEWAY_REDIS_URL": proxy.url,
            "GATEWAY_REDIS_TIMEOUT_MS": str(REDIS_TIMEOUT_MS),
            "GATEWAY_CACHE_PREFIX": "faults",
            "GATEWAY_BACKEND": "sklearn",
            "GATEWAY_L2_MIN_CALL_US": "0",
            "GATEWAY_L1_TTL_S": "0.2",
        }
        with gateway_process(env) as a, gateway_process(env) as b:
            yield Setup(rs, proxy, [a, b], rows, iris_estimator.predict(rows).tolist(),
                        iris_estimator.predict_proba(rows).tolist())


async def _client(setup: Setup, k: int, stop: asyncio.Event, tally: Tally) -> None:
    rng = np.random.default_rng(k)
    n = len(setup.rows)
    async with httpx.AsyncClient(base_url=setup.gateways[k % 2].base, timeout=10) as client:
        while not stop.is_set():
            kind = rng.integers(3)
            idx = [int(i) for i in rng.integers(n, size=1 if kind == 0 else 2 + kind)]
            rows = setup.rows[idx]
            start = time.monotonic()
            try:
                if kind == 0:
                    r = await client.get("/predict", params=dict(
                        zip(IRIS_FEATURES, map(float, rows[0]), strict=True)))
                elif kind == 1:
                    r = await client.post("/v1/models/iris/predict",
                                          json={"instances": rows.tolist(), "probabilities": True})
                else:
                    r = await client.post("/v2/models/iris/infer", json={"inputs": [{
                        "name": "input", "shape": list(rows.shape), "datatype": "FP64",
                        "data": rows.ravel().tolist()}]})
            except httpx.HTTPError as exc:
                tally.failures.append(f"{kind}: {exc!r}")
                tally.record(time.monotonic() - start)
                continue
            tally.record(time.monotonic() - start)
            if r.status_code != 200:
                tally.failures.append(f"{kind}: {r.status_code} {r.text[:100]}")
                continue
            labels = [setup.labels[i] for i in idx]
            probs = [setup.probs[i] for i in idx]
            body = r.json()
            if kind == 0:
                right = body == {"prediction": labels[0]}
            elif kind == 1:
                right = body["predictions"] == labels and body["probabilities"] == probs
            else:
                out = {o["name"]: o for o in body["outputs"]}
                right = (out["label"]["data"] == labels
                         and out["probabilities"]["data"] == [p for ps in probs for p in ps]
                         and out["probabilities"]["shape"] == [len(idx), 3])
            if not right:
                tally.wrong.append(f"{kind} {rows.tolist()}: {r.text[:200]}")


def _scenario(setup: Setup, name: str, fault: Callable[[Tally], Awaitable[None]]) -> None:
    async def run() -> Tally:
        tally = Tally()
        stop = asyncio.Event()
        clients = [asyncio.ensure_future(_client(setup, k, stop, tally)) for k in range(CLIENTS)]
        try:
            await tally.more(100)  # warm: Redis filled, connections open
            await setup.redis_used(tally, "before the fault")
            await fault(tally)
            await setup.redis_used(tally, "after the fault")
            await tally.more(100)  # and after
        finally:
            stop.set()
            await asyncio.gather(*clients)
        return tally

    hits_before = setup.l2_hits()
    started = time.monotonic()
    tally = asyncio.run(run())
    hits = setup.l2_hits() - hits_before
    print(f"{name}: {tally.requests} requests in {time.monotonic() - started:.1f} s, "
          f"{len(tally.failures)} failed, {len(tally.wrong)} wrong, "
          f"max latency {tally.max_latency_s * 1000:.0f} ms, l2 hits {hits:.0f} "
          f"(checks: {', '.join(tally.l2_checks)})")
    assert not tally.failures, tally.failures[:5]
    assert not tally.wrong, tally.wrong[:5]


def test_redis_killed_three_times_and_restarted(setup: Setup) -> None:
    async def fault(tally: Tally) -> None:
        for i in range(3):
            setup.redis.kill()
            await tally.more(100)
            await asyncio.to_thread(setup.redis.start)  # empty: no persistence
            await tally.more(150)
            await setup.redis_used(tally, f"after restart {i + 1}")

    _scenario(setup, "redis SIGKILL x3 with restarts", fault)


def test_redis_stopped_for_5_s(setup: Setup) -> None:
    async def fault(tally: Tally) -> None:
        setup.redis.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(5)  # the fault itself: Redis frozen for 5 s
        finally:
            setup.redis.signal(signal.SIGCONT)
        await tally.more(150)

    _scenario(setup, "redis SIGSTOP 5 s, then SIGCONT", fault)


@pytest.mark.parametrize("delay_ms", [200, 15])
def test_redis_behind_a_slow_network(setup: Setup, delay_ms: int) -> None:
    async def fault(tally: Tally) -> None:
        setup.proxy.delay_s = delay_ms / 1000
        try:
            await tally.more(500)
            if 2 * delay_ms < REDIS_TIMEOUT_MS:  # replies come in time
                await setup.redis_used(tally, f"behind {delay_ms} ms")
        finally:
            setup.proxy.delay_s = 0.0

    _scenario(setup, f"redis behind a {delay_ms} ms one-way delaying proxy", fault)
