"""The gateway's Redis client: a connection pool kept warm, calls bounded apart from connects.

``connect_redis`` returns a ``redis.asyncio.Redis`` whose behaviour differs in three ways, so
that a Redis a few round trips away stays useful instead of being given up for good:

* **Opening a connection is not a call.** A connection is opened (TCP, TLS, ``AUTH``) within
  ``connect_timeout_s`` (generous: about a second), in a task of its own. A call that needed it
  may give up first; the connection is still opened and joins the pool for the next call.
* **A late reply does not cost the connection.** Each command or pipeline runs in a task of its
  own; the caller waits at most ``command_timeout_s`` and then gets ``redis.TimeoutError``
  (being cancelled by its own deadline has the same effect), while the task goes on reading the
  reply, up to ``max(connect_timeout_s, command_timeout_s)``, and hands the connection back to
  the pool in a state ready for the next command. (Stock redis-py closes a connection whose read
  was interrupted, so every timeout at high latency meant a new connect, which could not finish
  within the timeout either.)
* **Warm connections first.** The first call opens ``warm_connections`` connections in the
  background; a call takes an open connection whenever one is free, and only opens a new one
  when none is. TCP keepalive finds dead peers (``redis://``, ``rediss://``).
* **Commands are packed in one pass.** redis-py joins a command's whole buffer again for each
  argument, which is quadratic in its size; the lease scripts of a block carry a few hundred
  arguments. The gateway's connections send the same bytes, joined once, and splice ``Packed``
  arguments (already encoded, once per key rather than once per call) as they are.
* **A lost connection drops the idle ones.** A call that fails because its connection was
  closed (a Redis restart, a failover) disconnects every idle connection of the pool too: they
  went to the same server, and each would otherwise fail one call of its own when next taken
  (hiredis sees the close only on a read). The next calls open fresh connections, warmed again
  in the background; a restarted Redis costs one failed call, not one per pooled connection.

redis-py's own retries are off: the caller's circuit breaker decides when to try again.
Close with ``await client.aclose()``, which also stops the background tasks.

``connect_redis_cluster`` returns a ``redis.asyncio.RedisCluster`` for a
``redis+cluster://host:port`` (or ``rediss+cluster://``) URL naming any node of a Redis Cluster:
the client learns the slot map from it and talks to each master directly. Callers bound each
call themselves; a master that is down fails only the calls that reach its slots.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import DEFAULT_BASE, DEFAULT_CAP, ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["CLUSTER_SCHEMES", "REDIS_FAILURES", "BoundedRedis", "Packed", "bulk", "connect_node",
           "connect_redis", "connect_redis_cluster", "is_cluster_url", "listen",
           "subscriber_for"]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
"""What a Redis call may fail with, client or cluster, network or timeout: the gateway serves
on without Redis for each of them."""

log = logging.getLogger("gateway.redis")

_RESUBSCRIBE_MAX_S = 2.0
_CLOSE_S = 1.0  # closing a subscription's connection, at most


def connect_redis(
    url: str,
    *,
    connect_timeout_s: float,
    command_timeout_s: float,
    max_connections: int,
    warm_connections: int = 4,
) -> BoundedRedis:
    """A client for ``redis://``, ``rediss://`` or ``unix://`` ``url`` (see the module
    docstring). Nothing is connected until the first call, so a Redis that is down does not
    fail this. Raises ValueError for a bad URL or limits out of range."""
    if connect_timeout_s <= 0 or command_timeout_s <= 0:
        raise ValueError("timeouts must be > 0")
    if max_connections < 1 or warm_connections < 0:
        raise ValueError("max_connections must be >= 1 and warm_connections >= 0")
    tcp = urlsplit(url).scheme in ("redis", "rediss")
    pool = _WarmPool.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=max(connect_timeout_s, command_timeout_s),  # bound on a late reply
        max_connections=max_connections,
        retry=Retry(NoBackoff(), 0),
        **({"socket_keepalive": True} if tcp else {}),
    )
    pool.connection_class = _PACKED.get(pool.connection_class, pool.connection_class)
    return BoundedRedis(pool, command_timeout_s=command_timeout_s,
                         warm_connections=min(warm_connections, max_connections))


def connect_node(host: str, port: int, *, connect_timeout_s: float) -> aioredis.Redis:
    """A plain client of one cluster master at ``host:port`` whose connections take ``Packed``
    arguments (TCP keepalive on; callers bound their calls)."""
    pool = aioredis.ConnectionPool(host=host, port=port, socket_connect_timeout=connect_timeout_s,
                                   socket_keepalive=True, connection_class=_PackedConnection)
    return aioredis.Redis.from_pool(pool)


def is_cluster_url(url: str) -> bool:
    """Does ``url`` name a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)?"""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def _node_url(url: str) -> str:
    scheme, _, rest = url.partition("+cluster")
    return scheme + rest


def connect_redis_cluster(
    url: str, *, connect_timeout_s: float, command_timeout_s: float, max_connections: int,
) -> RedisCluster:
    """A cluster client for ``url`` (see the module docstring); nothing is connected until
    the first call. Slots whose master is down fail their calls; the others go on."""
    if connect_timeout_s <= 0 or command_timeout_s <= 0:
        raise ValueError("timeouts must be > 0")
    return RedisCluster.from_url(
        _node_url(url),
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=max(connect_timeout_s, command_timeout_s),
        max_connections=max_connections,
        require_full_coverage=False,
        retry=Retry(ExponentialWithJitterBackoff(base=DEFAULT_BASE, cap=DEFAULT_CAP), 1),
        socket_keepalive=True,
    )


def subscriber_for(url: str, client: Any, *, connect_timeout_s: float) -> aioredis.Redis:
    """A client for one pub/sub subscription (no read timeout: it waits for messages). For a
    cluster, on a node taken at random from ``client``'s known nodes (messages published on
    any node reach every node), else the URL's own server."""
    if isinstance(client, RedisCluster):
        nodes = client.get_nodes()
        if nodes:
            node = random.choice(nodes)
            return aioredis.Redis(host=node.host, port=int(node.port),
                                  socket_connect_timeout=connect_timeout_s,
                                  socket_keepalive=True)
        url = _node_url(url)
    tcp = urlsplit(url).scheme in ("redis", "rediss")
    return aioredis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                   **({"socket_keepalive": True} if tcp else {}))


async def listen(subscriber: Callable[[], Any], channel: str,
                 on_message: Callable[[bytes], None], subscribed: asyncio.Event) -> None:
    """Subscribe to ``channel`` and hand each message's data to ``on_message``, until
    cancelled: a lost subscription is made again after a backoff (50 ms, doubling to 2 s,
    against a Redis that is down). ``subscriber()`` makes the client for each attempt (closed
    when it ends); ``subscribed`` is set while subscribed."""
    backoff = 0.05
    while True:
        client = subscriber()
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(channel)
            subscribed.set()
            backoff = 0.05
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if msg is not None and msg.get("type") == "message":
                    on_message(msg["data"])
        except (RedisError, OSError) as exc:
            log.debug("channel %s lost (%r); subscribing again", channel, exc)
        finally:
            subscribed.clear()
            try:
                async with asyncio.timeout(_CLOSE_S):
                    await pubsub.aclose()
                    await client.aclose()
            except (RedisError, OSError, TimeoutError):
                pass
        await asyncio.sleep(backoff)  # the backoff itself
        backoff = min(backoff * 2, _RESUBSCRIBE_MAX_S)


def bulk(data: bytes) -> bytes:
    """``data`` as one RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


class Packed(bytes):
    """``arguments`` command arguments already encoded (``bulk`` strings, concatenated), which the
    gateway's connections (``connect_redis``, ``connect_node``) splice into a command as they
    are. Any other client would send them as one argument."""

    arguments: int

    def __new__(cls, data: bytes, arguments: int) -> Packed:
        self = super().__new__(cls, data)
        self.arguments = arguments
        return self


class _OnePassPacking:
    """``pack_command`` as redis-py's (the same bytes: the command name split at spaces, each
    argument encoded by the connection's encoder), joined once rather than once per argument;
    ``Packed`` arguments spliced as they are."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str):
            args = (*name.encode().split(), *args[1:])
        elif b" " in name:
            args = (*name.split(), *args[1:])
        encoder = self.encoder
        encode, encoding, errors = encoder.encode, encoder.encoding, encoder.encoding_errors
        parts = [b""]
        count = 0
        for arg in args:
            kind = type(arg)  # the common kinds first, as the encoder would write them
            if kind is Packed:
                parts.append(arg)
                count += arg.arguments
                continue
            data = (arg if kind is bytes else arg.encode(encoding, errors) if kind is str
                    else b"%d" % arg if kind is int else encode(arg))
            parts += (b"$%d\r\n" % len(data), data, b"\r\n")
            count += 1
        parts[0] = b"*%d\r\n" % count
        return [b"".join(parts)]


class _PackedConnection(_OnePassPacking, Connection):
    pass


class _PackedSSLConnection(_OnePassPacking, SSLConnection):
    pass


class _PackedUnixConnection(_OnePassPacking, UnixDomainSocketConnection):
    pass


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _PackedConnection, SSLConnection: _PackedSSLConnection,
    UnixDomainSocketConnection: _PackedUnixConnection}


class _WarmPool(aioredis.ConnectionPool):
    """A pool that hands out an open connection whenever one is free (redis-py's takes the
    most recently released one, open or not, and reconnects it inside the caller's call)."""

    def get_available_connection(self) -> AbstractConnection:
        free: list[AbstractConnection] = self._available_connections
        for i in range(len(free) - 1, -1, -1):
            if free[i].is_connected:
                connection = free.pop(i)
                self._in_use_connections.add(connection)
                return connection
        fresh: AbstractConnection = super().get_available_connection()  # type: ignore[no-untyped-call]
        return fresh


class BoundedRedis(aioredis.Redis):
    """``Redis`` whose calls are bounded by ``command_timeout_s`` without interrupting the
    connection's own read (see the module docstring)."""

    def __init__(
        self, pool: _WarmPool, *, command_timeout_s: float, warm_connections: int
    ) -> None:
        super().__init__(connection_pool=pool)
        self.auto_close_connection_pool = True  # this client owns its pool
        self._command_timeout = command_timeout_s
        self._warm_target = warm_connections
        self._warming: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()  # calls and warm-up, until settled
        self._dropping = False  # idle connections being dropped after a lost one

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        call = super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        return await self.bounded(call)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return _BoundedPipeline(self, transaction, shard_hint)

    async def bounded(self, call: Coroutine[Any, Any, Any]) -> Any:
        """Run ``call`` in a task of its own; wait for it at most ``command_timeout_s``.

        Raises:
            redis.TimeoutError: no reply in time (the task goes on, and returns its connection
                to the pool once the reply is read).
            whatever ``call`` raised.
        """
        loop = asyncio.get_running_loop()
        if self._warming is None and self._warm_target:
            self._warming = self._track(loop.create_task(self._warm_up()))
        task = self._track(loop.create_task(call))
        deadline = asyncio.timeout(self._command_timeout)
        try:
            async with deadline:
                return await asyncio.shield(task)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise RedisTimeoutError(
                f"no reply within {self._command_timeout * 1000:.0f} ms "
                "(the connection stays open for the late reply)"
            ) from None

    def _track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self._background.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved: no warning
        if exc is None:
            return
        log.debug("redis call ended with %r", exc)
        if (isinstance(exc, RedisConnectionError) and not isinstance(exc, MaxConnectionsError)
                and not self._dropping):
            self._dropping = True
            self._track(asyncio.get_running_loop().create_task(self._drop_idle()))

    async def _drop_idle(self) -> None:
        """Disconnect the pool's idle connections; the next call warms it up again."""
        try:
            await self.connection_pool.disconnect(inuse_connections=False)
        finally:
            self._dropping = False
            if self._warming is not None and self._warming.done():
                self._warming = None

    async def _warm_up(self) -> None:
        """Open ``warm_connections`` connections at once and put them in the pool."""
        pool = self.connection_pool
        opened = await asyncio.gather(
            *(pool.get_connection() for _ in range(self._warm_target)),  # type: ignore[no-untyped-call]
            return_exceptions=True,
        )
        for connection in opened:
            if isinstance(connection, AbstractConnection):
                await pool.release(connection)
        failures = [c for c in opened if isinstance(c, BaseException)]
        if failures:
            log.debug("redis warm-up: %d of %d connections failed (%r)", len(failures),
                      len(opened), failures[0])

    async def settled(self) -> None:
        """Wait until every call given up by its caller has read its reply (or failed)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Stop the background calls, then close the pool."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().aclose(close_connection_pool)


class _BoundedPipeline(Pipeline):
    """A pipeline whose ``execute`` is bounded like the commands of its client."""

    def __init__(self, owner: BoundedRedis, transaction: bool, shard_hint: str | None) -> None:
        super().__init__(owner.connection_pool, owner.response_callbacks, transaction,
                         shard_hint)
        self._owner = owner

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        result: list[Any] = await self._owner.bounded(super().execute(raise_on_error))
        return result
