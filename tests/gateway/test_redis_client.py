"""The gateway's Redis client against a real redis-server, through a proxy adding latency."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from bench.procs import redis_server
from gateway.redis_client import connect_redis
from tests.hardening.procs import DelayProxy

pytestmark = pytest.mark.anyio


async def test_a_late_reply_keeps_its_connection(redis_server: Any) -> None:
    """Three calls given up after 20 ms on a 60 ms round trip: one connection, opened in the
    background and reused; stock redis-py closes the connection at each timeout."""
    with DelayProxy(redis_server.port, delay_s=0.03) as proxy:
        client = connect_redis(proxy.url, connect_timeout_s=2, command_timeout_s=0.02,
                               max_connections=4, warm_connections=0)
        try:
            for _ in range(3):
                with pytest.raises(redis.TimeoutError, match="no reply within 20 ms"):
                    await client.ping()
                await client.settled()  # the late reply has been read
            assert proxy.accepted == 1
            proxy.delay_s = 0.0
            assert await client.ping() is True
            assert await client.set("hardening:late", b"v") is True
            pipe = client.pipeline(transaction=False)
            pipe.get("hardening:late")
            pipe.delete("hardening:late")
            assert await pipe.execute() == [b"v", 1]
            assert proxy.accepted == 1
        finally:
            await client.aclose()

        stock = aioredis.from_url(proxy.url, socket_timeout=0.02,
                                  retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0))
        try:
            proxy.delay_s = 0.03
            for _ in range(2):
                with pytest.raises(redis.TimeoutError):
                    await stock.ping()
            assert proxy.accepted == 3  # what the client above avoids
        finally:
            await stock.aclose()


async def test_warm_connections_are_opened_on_first_use(redis_server: Any) -> None:
    with DelayProxy(redis_server.port) as proxy:
        client = connect_redis(proxy.url, connect_timeout_s=2, command_timeout_s=1,
                               max_connections=8, warm_connections=3)
        try:
            assert proxy.accepted == 0  # nothing connects before the first call
            assert await client.ping() is True
            await client.settled()
            assert proxy.accepted >= 3
            opened = proxy.accepted
            for _ in range(20):
                assert await client.ping() is True
            assert proxy.accepted == opened
        finally:
            await client.aclose()


@pytest.mark.e2e
async def test_a_restarted_redis_costs_one_failed_call_not_one_per_pooled_connection(
        tmp_path: Path) -> None:
    """The server closed 30 pooled connections; hiredis learns it only by reading, so each would
    fail a call of its own. The first failure drops the idle ones."""
    with redis_server(tmp_path) as rs:
        client = connect_redis(rs.url, connect_timeout_s=2, command_timeout_s=1,
                               max_connections=64, warm_connections=4)
        try:
            await asyncio.gather(*(client.blpop(["hardening:none"], timeout=0.05)
                                   for _ in range(30)))  # 30 connections at once
            await client.settled()
            assert len(client.connection_pool._available_connections) >= 30
            rs.kill()
            rs.start()  # empty, on the same port
            outcomes = []
            for _ in range(5):
                try:
                    outcomes.append(await client.ping())
                except redis.ConnectionError:
                    outcomes.append(False)
                await client.settled()
            assert outcomes in ([False, True, True, True, True], [True] * 5), outcomes
        finally:
            await client.aclose()


async def test_a_redis_that_is_down_fails_calls_quickly_and_closes_cleanly() -> None:
    from bench.procs import free_port

    client = connect_redis(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=1,
                           command_timeout_s=0.5, max_connections=2)
    try:
        with pytest.raises(redis.ConnectionError):
            await client.ping()
    finally:
        await client.aclose()


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="timeouts"):
        connect_redis("redis://127.0.0.1:1/0", connect_timeout_s=0, command_timeout_s=1,
                      max_connections=1)
    with pytest.raises(ValueError, match="max_connections"):
        connect_redis("redis://127.0.0.1:1/0", connect_timeout_s=1, command_timeout_s=1,
                      max_connections=0)


def test_cluster_urls_are_recognised_and_accepted_by_the_settings() -> None:
    from gateway.redis_client import is_cluster_url
    from gateway.settings import Settings

    assert is_cluster_url("redis+cluster://127.0.0.1:7000")
    assert is_cluster_url("rediss+cluster://u:p@node:7000")
    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    assert Settings(redis_url="redis+cluster://127.0.0.1:7000").redis_url


@pytest.mark.parametrize(("url", "kind"), [
    ("redis://127.0.0.1:1/0", aioredis.Connection),
    ("rediss://127.0.0.1:1/0", aioredis.SSLConnection),
    ("unix:///tmp/none.sock", aioredis.UnixDomainSocketConnection)])
def test_commands_are_packed_in_one_pass_into_redis_pys_bytes(url: str, kind: type) -> None:
    client = connect_redis(url, connect_timeout_s=1, command_timeout_s=1, max_connections=1)
    ours = client.connection_pool.make_connection()
    stock = kind()
    assert type(ours) is not kind and isinstance(ours, kind)
    big = b"v" * 10_000
    commands: list[tuple[Any, ...]] = [
        ("PING",), ("SCRIPT LOAD", "return 1"), (b"CONFIG GET", b"maxmemory"),
        ("EVALSHA", "ab" * 20, 6, *(f"k{i}" for i in range(6)), b"channel", 7, 1.5, "é",
         memoryview(b"view"), big, b""),
        ("SET", "k", big, "EX", 60), ("INCRBY", "k", -7), ("SET", "k", 2**70, "PX", 0),
    ]
    for command in commands:
        assert b"".join(ours.pack_command(*command)) == b"".join(
            stock.pack_command(*command)), command
    with pytest.raises(redis.DataError):
        ours.pack_command("SET", "k", True)


def test_packed_arguments_are_spliced_as_the_arguments_they_encode() -> None:
    from gateway.redis_client import Packed, bulk, connect_node

    keys, argv = [b"k1", b"{k1}:l", "é".encode()], [b"channel", b"250", b""]
    command = ("EVALSHA", "ab" * 20, 3, *keys, *argv)
    spliced = ("EVALSHA", "ab" * 20, 3, Packed(b"".join(map(bulk, keys)), 3),
               argv[0], Packed(b"".join(map(bulk, argv[1:])), 2))
    client = connect_redis("redis://127.0.0.1:1/0", connect_timeout_s=1, command_timeout_s=1,
                           max_connections=1)
    node = connect_node("127.0.0.1", 1, connect_timeout_s=1)
    stock = b"".join(aioredis.Connection().pack_command(*command))
    for ours in (client.connection_pool.make_connection(),
                 node.connection_pool.make_connection()):
        assert b"".join(ours.pack_command(*spliced)) == stock
