"""What ``gateway/redis_client.py``, ``gateway/remote.py``, ``gateway/cache.py`` and
``gateway/runtime.py`` rely on inside redis-py: the async pool's free list (warm connections
first), the client's command path and pipeline (bounded calls), scripts, pub/sub and the cluster
slot map (cross-replica single-flight). ``FENCE`` is the table (see ``fence.py``); the tests
below it run redis-py's code, never connecting, for the behaviours a digest alone does not
show."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from tests.contracts.fence import Fence, check, pin, report

RC = "redis.asyncio.connection"
RA = "redis.asyncio.client"
CL = "redis.asyncio.cluster"

FENCE = Fence("redis", "8.1.0", "tests/contracts/test_redis.py", (
    # The pool: _WarmPool takes a connected connection from the free list, else redis-py's.
    pin(RC, "ConnectionPool.get_available_connection", "5777614ddec0",
        "redis_client:_WarmPool.get_available_connection"),
    pin(RC, "ConnectionPool.get_connection", "9773fd0f3df0",  # the above under the lock
        "redis_client:_WarmPool.get_available_connection", "redis_client:BoundedRedis._warm_up"),
    pin(RC, "ConnectionPool.ensure_connection", "d144a7b72ed3",  # reconnects in the call
        "redis_client:_WarmPool.get_available_connection"),
    pin(RC, "ConnectionPool.release", "e7d317be9fa6",  # to the end of the free list
        "redis_client:_WarmPool.get_available_connection", "redis_client:BoundedRedis._warm_up"),
    pin(RC, "AbstractConnection.is_connected", "a3b3b056f688",
        "redis_client:_WarmPool.get_available_connection"),
    pin(RC, "ConnectionPool.from_url", None, "redis_client:connect_redis",
        signature="url, **kwargs"),
    # Packing: the pool's connection_class swapped for one packing the same bytes in one pass.
    pin(RC, "ConnectionPool.make_connection", "d6f95077e241", "redis_client:connect_redis"),
    pin(RC, "AbstractConnection.pack_command", "9a0e503fdcf5",
        "redis_client:_OnePassPacking.pack_command"),
    # The client: every command through execute_command, bounded; pipelines replaced.
    pin(RA, "Redis.execute_command", "b35fa092ad03", "redis_client:BoundedRedis.execute_command"),
    pin(RA, "Redis.pipeline", "15119889197c", "redis_client:BoundedRedis.pipeline"),
    pin(RA, "Redis.aclose", "47f19b725dd4",  # closes the pool if auto_close_connection_pool
        "redis_client:BoundedRedis.aclose", "redis_client:BoundedRedis.__init__"),
    pin(RA, "Pipeline.__init__", "0daebf0757f4", "redis_client:_BoundedPipeline.__init__"),
    pin(RA, "Pipeline.execute", "f61e1ae2ffba", "redis_client:_BoundedPipeline.execute"),
    pin(RA, "PubSub.get_message", "bf92023c2c45", "redis_client:listen"),  # None: blocks
    pin("redis.asyncio.retry", "Retry", None,
        "redis_client:connect_redis", signature="backoff, retries, supported_errors"),
    pin("redis.backoff", "ExponentialWithJitterBackoff", None,
        "redis_client:connect_redis_cluster", signature="cap, base"),
    pin("redis.backoff", "DEFAULT_BASE", None, "redis_client:connect_redis_cluster"),
    pin("redis.backoff", "DEFAULT_CAP", None, "redis_client:connect_redis_cluster"),
    # Scripts: sha and source read and set by Remote; called with keys= and args=.
    pin("redis.commands.core", "AsyncScript.__init__", "dab4168cfee6",
        "remote:Remote.start", "remote:Remote._per_node"),
    pin("redis.commands.core", "AsyncScript.__call__", "6ebd89ad2abd", "remote:Remote._run"),
    # The cluster: the slot map read by Remote, the slot function used for its keys.
    pin(CL, "NodesManager.get_node_from_slot", "082b1a82db1d", "remote:Remote._per_node"),
    pin(CL, "RedisCluster.from_url", None, "redis_client:connect_redis_cluster",
        signature="url, **kwargs"),
    pin(CL, "RedisCluster.mget_nonatomic", None, "cache:RedisCache._mget",
        signature="self, keys, *args"),
    pin(CL, "RedisCluster.get_nodes", None, "redis_client:subscriber_for", signature="self"),
    pin("redis.crc", "key_slot", "402cb9c64c6a", "runtime:_open_remote"),
))


def test_redis_pins_hold() -> None:
    problems = check(FENCE)
    assert not problems, report(problems)


def test_a_released_connection_goes_to_the_end_and_the_warm_pool_takes_a_connected_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``_WarmPool`` scans the free list from its end (where ``release`` puts a connection)
    for one that is connected, else lets redis-py take the last one (re-check
    ``_WarmPool.get_available_connection`` in gateway/redis_client.py)."""
    from gateway.redis_client import _WarmPool

    async def scenario() -> None:
        pool = _WarmPool(max_connections=4)
        assert pool._available_connections == [] and not pool._in_use_connections
        first, second = pool.get_available_connection(), pool.get_available_connection()
        assert pool._in_use_connections == {first, second}
        connected = {first}
        monkeypatch.setattr(type(first), "is_connected",
                            property(lambda self: self in connected))
        await pool.release(first)
        await pool.release(second)
        assert pool._available_connections == [first, second]
        assert pool.get_available_connection() is first  # connected, though not the last
        assert pool.get_available_connection() is second  # none connected: redis-py's pick
        assert not pool._available_connections
        connected.clear()  # nothing to disconnect
        await pool.aclose()

    asyncio.run(scenario())


def test_the_bounded_client_owns_its_pool_and_makes_bounded_pipelines() -> None:
    from gateway.redis_client import BoundedRedis, _BoundedPipeline, connect_redis

    async def scenario() -> None:
        client = connect_redis("redis://127.0.0.1:1/0", connect_timeout_s=1,
                               command_timeout_s=1, max_connections=2)
        assert isinstance(client, BoundedRedis) and client.auto_close_connection_pool
        pipe = client.pipeline(transaction=False)
        assert isinstance(pipe, _BoundedPipeline) and isinstance(pipe, Pipeline)
        assert pipe.connection_pool is client.connection_pool and not pipe.is_transaction
        assert pipe.response_callbacks is client.response_callbacks
        closed: list[bool] = []
        pool_close = client.connection_pool.aclose

        async def aclose() -> None:
            closed.append(True)
            await pool_close()

        client.connection_pool.aclose = aclose  # type: ignore[method-assign]
        await client.aclose()
        assert closed == [True]

    asyncio.run(scenario())


def test_a_script_object_carries_its_source_and_a_settable_sha() -> None:
    """``Remote`` loads each script itself and sets ``script.sha``; on a cluster it sends
    ``EVALSHA script.sha`` in per-node pipelines and reloads ``script.script``."""
    from gateway.redis_client import connect_redis

    async def scenario() -> None:
        client = connect_redis("redis://127.0.0.1:1/0", connect_timeout_s=1,
                               command_timeout_s=1, max_connections=1)
        script: Any = client.register_script("return 1")
        assert script.script == "return 1"
        assert script.sha == "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"  # SHA-1 of the source
        script.sha = "x"
        assert script.sha == "x"
        await client.aclose()

    asyncio.run(scenario())


def test_a_cluster_client_is_made_without_connecting_and_has_a_slot_map() -> None:
    from gateway.redis_client import connect_redis_cluster

    async def scenario() -> None:
        client = connect_redis_cluster("redis+cluster://127.0.0.1:1", connect_timeout_s=1,
                                       command_timeout_s=1, max_connections=2)
        assert callable(client.nodes_manager.get_node_from_slot)
        await client.aclose()

    asyncio.run(scenario())
    node = ClusterNode("127.0.0.1", 7000)
    assert (node.name, node.host, node.port) == ("127.0.0.1:7000", "127.0.0.1", 7000)


def test_key_slots_follow_the_cluster_spec_and_hash_tags() -> None:
    """A value key and its lease and waiters keys share a slot (``lease_key`` in
    gateway/remote.py: ``{key}:l``)."""
    assert key_slot(b"foo") == 12182
    assert key_slot(b"{gw:iris:1:abc}:l") == key_slot(b"gw:iris:1:abc")


def test_a_connection_knows_whether_it_is_connected_without_connecting() -> None:
    from redis.asyncio.connection import Connection

    connection = Connection(host="127.0.0.1", port=1)
    assert isinstance(connection, AbstractConnection) and connection.is_connected is False
