"""``Remote`` in one process against a real redis-server: two instances stand for two replicas.
The runner is a stand-in exposing what ``Remote`` reads (name, call time, TTL, validation)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import redis

from bench.procs import free_port
from gateway.breaker import CircuitBreaker
from gateway.cache import RedisCache
from gateway.core.batcher import Failure
from gateway.core.runner import ModelRunner, Unit
from gateway.metrics import Metrics
from gateway.redis_client import bulk, connect_redis, subscriber_for
from gateway.remote import Lookup, Remote, _redis_keys, _waiters_key, lease_key
from tests.support import wait_for

pytestmark = pytest.mark.anyio

ROWS = np.zeros((2, 4))
SECRET = bytes(32)


class StubRunner:
    cache_ttl_s = 60

    def __init__(self) -> None:
        self.manifest = SimpleNamespace(name="stub")
        self.executor = SimpleNamespace(per_call_s=0.0)

    def decode_value(self, _unit: Unit, value: bytes) -> bytes | None:
        return value if value in (b'"a"', b'"b"') else None


RUNNER = cast(ModelRunner, StubRunner())


@asynccontextmanager
async def replica(url: str, lease_ms: int = 200) -> AsyncIterator[tuple[Remote, Metrics]]:
    metrics = Metrics({})
    cache = RedisCache(
        connect_redis(url, connect_timeout_s=1, command_timeout_s=0.5, max_connections=8),
        timeout_s=0.5, ttl_s=60, breaker=CircuitBreaker(failures=3, cooldown_s=5),
        metrics=metrics, secret=SECRET)
    await cache.start()
    remote = Remote(cache, lambda: subscriber_for(url, cache.client, connect_timeout_s=1),
                    metrics, prefix="t", lease_min_s=lease_ms / 1000)
    await remote.start(2.0)
    try:
        yield remote, metrics
    finally:
        await remote.aclose()
        await cache.aclose()


def count(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"model": "stub"}) or 0.0


class Holder:
    """A local computation that waits for ``release`` (or raises ``error`` then)."""

    def __init__(self, values: list[bytes | Failure], error: Exception | None = None) -> None:
        self.values = values
        self.error = error
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.calls: list[int] = []

    async def __call__(self, _unit: Unit, rows: np.ndarray) -> list[bytes | Failure]:
        self.calls.append(len(rows))
        self.entered.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.values[:len(rows)]


def url(proc: Any) -> str:
    return f"redis://{proc.host}:{proc.port}/0"


async def _waiting(r: redis.Redis, key: str, remote: Remote) -> None:
    await wait_for(lambda: bool(r.sismember("{" + key + "}:w", remote.channel)))


async def test_a_waiting_replica_takes_the_holders_values(redis_server: Any) -> None:
    keys = ["t:m:1:a", "t:m:1:b"]
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    async with replica(url(redis_server)) as (a, ma), replica(url(redis_server)) as (b, mb):
        held = Holder([b'"a"', b'"b"'])
        first = asyncio.ensure_future(a.compute(RUNNER, "label", keys, ROWS, held))
        await held.entered.wait()
        assert r.get(lease_key(keys[0])) == a.channel.encode()  # the lease the script took
        other = Holder([b'"x"', b'"x"'])
        lookup = Lookup()
        second = asyncio.ensure_future(b.compute(RUNNER, "label", keys, ROWS, other,
                                                 lookup=lookup))
        await _waiting(r, keys[1], b)
        await wait_for(lambda: lookup.held == 2)  # the lookup found both computed by A
        assert lookup.stored == []
        r.publish(b.channel, keys[0].encode() + b'\n"forged"')  # no valid tag: ignored
        held.release.set()
        assert await first == [b'"a"', b'"b"']
        assert await second == [b'"a"', b'"b"']
        assert other.calls == []
        assert count(ma, "gateway_remote_leases_total") == 2
        assert count(mb, "gateway_remote_coalesced_total") == 2
        assert r.get(lease_key(keys[0])) is None  # freed
        assert r.get(keys[0]) is not None  # stored, sealed


async def test_a_failed_holder_hands_its_keys_over(redis_server: Any) -> None:
    keys = ["t:m:2:a", "t:m:2:b"]
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    async with replica(url(redis_server)) as (a, _), replica(url(redis_server)) as (b, mb):
        held = Holder([], error=RuntimeError("model gone"))
        first = asyncio.ensure_future(a.compute(RUNNER, "label", keys, ROWS, held))
        await held.entered.wait()
        mine = Holder([b'"b"', b'"a"'])
        mine.release.set()
        second = asyncio.ensure_future(b.compute(RUNNER, "label", keys, ROWS, mine))
        await _waiting(r, keys[0], b)
        held.release.set()
        with pytest.raises(RuntimeError):
            await first
        assert await second == [b'"b"', b'"a"']
        assert mine.calls == [2]
        assert count(mb, "gateway_remote_lease_expiries_total") == 2


async def test_redis_unreachable_computes_locally() -> None:
    async with replica(f"redis://127.0.0.1:{free_port()}/0") as (a, ma):
        mine = Holder([b'"a"', b'"b"'])
        mine.release.set()
        out = await a.compute(RUNNER, "label", ["t:m:3:a", "t:m:3:b"], ROWS, mine)
        assert out == [b'"a"', b'"b"'] and mine.calls == [2]
        assert count(ma, "gateway_remote_fallbacks_total") == 2
        assert not a.subscribed


async def test_the_lease_covers_four_holds_as_they_were_measured(redis_server: Any) -> None:
    """A lease lasts 4 average holds (won to stored) when those are longer than 4 calls: the
    queue before a loaded replica's call is part of the hold, and so is the store, which the
    answer does not wait for."""
    keys = ["t:m:hold:a", "t:m:hold:b"]
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    least = 0.001
    async with replica(url(redis_server), lease_ms=1) as (a, _):
        assert a.lease_s(RUNNER) == least  # no hold measured yet
        clock = asyncio.get_running_loop().time
        held = Holder([b'"a"', b'"b"'])
        start = clock()
        first = asyncio.ensure_future(a.compute(RUNNER, "label", keys, ROWS, held))
        await held.entered.wait()
        entered = clock()
        while clock() - entered < least:  # held over a millisecond of Redis round trips
            r.ping()
        held.release.set()
        released = clock()
        assert await first == [b'"a"', b'"b"']
        await wait_for(lambda: a.lease_s(RUNNER) != least)  # stored after the answer
        elapsed = clock() - start
        assert 4 * (released - entered) <= a.lease_s(RUNNER) <= 4 * elapsed
    r.close()


async def test_announcements_reach_every_watch_of_their_key_even_before_the_reply(
        redis_server: Any) -> None:
    """An announcement may arrive on the channel before the script reply that says to wait
    for it: the watch made before the call keeps it. Two blocks of one process listening for
    one key both get it; each stops listening alone."""
    keys = ["t:m:3:a", "t:m:3:b"]
    async with replica(url(redis_server)) as (b, _):
        def announce(key: str, value: bytes) -> None:
            b._deliver(key.encode() + b"\n\n" + b._cache.seal(key, value))

        early, late = b._expect(keys), b._expect([keys[1]])
        announce(keys[0], b'"a"')  # before the reply of early's call
        out: list[Any] = [None, None]
        await b._await(RUNNER, "label", keys, [0], early, out, 5.0)  # returns at once
        assert out == [b'"a"', None]
        waiting = asyncio.ensure_future(b._await(RUNNER, "label", keys, [1], early, out, 5.0))
        other: list[Any] = [None, None]
        waiting_too = asyncio.ensure_future(
            b._await(RUNNER, "label", keys, [1], late, other, 5.0))
        await asyncio.sleep(0)
        assert not waiting.done() and not waiting_too.done()
        announce(keys[1], b'"b"')
        await asyncio.wait_for(asyncio.gather(waiting, waiting_too), 5.0)
        assert out == [b'"a"', b'"b"'] and other == [None, b'"b"']
        b._unexpect(keys, early)
        assert set(b._waiting) == {keys[1]}  # late still listens
        b._unexpect([keys[1]], late)
        assert b._waiting == {}


@pytest.mark.parametrize("key", ["t:m:1:a", "préfixe:ü:1"])
def test_a_keys_script_arguments_are_its_three_keys_as_bulk_strings(key: str) -> None:
    assert _redis_keys(key) == b"".join(
        bulk(k.encode()) for k in (key, lease_key(key), _waiters_key(key)))
