"""Cache tiers: an in-process L1 in front of a shared Redis L2.

L1 is bounded by entries (LRU eviction) and by age, and holds encoded values (bytes), which
the garbage collector never has to traverse. L2 is Redis as an accelerator, never a
dependency: every call is bounded by ``timeout_s``, failures feed a circuit breaker that skips
Redis while open, and an unreachable Redis reads as a miss. Lookups issued within one
event-loop tick go out as one ``MGET``; writes are queued (bounded) and sent in
pipelines by a background task, so neither delays a response. On a Redis Cluster a lookup is one
``MGET`` per node and writes are per-node pipelines. A background ``PING`` every second measures
the round trip (``round_trip_s``: the minimum over the last 16, which leaves out the moments
the event loop was busy) and, while the circuit is open, is the probe that closes it.

Every value is stored bound to its key: a format byte, then a BLAKE2b tag over key and value,
then the value. A value whose tag does not verify is read back as ``INVALID`` (a miss): without
a secret the digest is unkeyed, which catches a value copied under another row's key and
corruption; with a secret it is keyed, so whoever can write to Redis cannot make the gateway
serve their answer either. Entries of an older format (no format byte) read as ``INVALID``
too, never as an answer: an upgrade costs misses, never a misread value.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from hashlib import blake2b
from typing import Literal

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.breaker import CircuitBreaker
from gateway.metrics import Metrics
from gateway.redis_client import REDIS_FAILURES
from gateway.tracing import Traced, current

__all__ = ["INVALID", "L1Cache", "RedisCache"]

log = logging.getLogger("gateway.cache")

_WRITE_CHUNK = 512
_TAG_BYTES = 16
_FORMAT = b"\x01"  # the first byte of every stored value: format byte, tag, value
_HEAD = len(_FORMAT) + _TAG_BYTES
_PROBE_EVERY_S = 1.0
_ROUND_TRIPS_KEPT = 16

# A lookup waiting for this tick's MGET: its keys, its future, its sampled request (if any).
_Lookup = tuple[Sequence[str], "asyncio.Future[list[bytes | None] | None]", Traced | None]

INVALID = b""
"""What ``RedisCache.get_many`` returns for a value whose integrity tag does not verify."""


class L1Cache:
    """In-process TTL + LRU map from key to encoded value. Event-loop thread only.

    An ``OrderedDict`` of ``key -> value`` in recency order beside a dict of ``key ->
    expires_at``: a lookup is two dict probes and a ``move_to_end``. No object is made per
    entry that the garbage collector tracks (a ``(expires_at, value)`` tuple would be, until a
    collection untracks it): under churn the entries evicted cancel the new ones in the
    collector's count, so a young generation of tens of thousands of such tuples would build
    up between collections and each collection would scan them all, milliseconds of the event
    loop's time at once. Expired entries are dropped when touched, or evicted as least
    recently used.
    """

    def __init__(
        self, max_entries: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("max_entries must be >= 1 and ttl_s > 0")
        self._max = max_entries
        self._ttl = ttl_s
        self._clock = clock
        self._values: OrderedDict[str, bytes] = OrderedDict()
        self._expires: dict[str, float] = {}  # the same keys as _values
        self.writes = 0
        """Calls of ``put`` and ``put_many`` so far: unchanged means nothing was stored."""

    def get(self, key: str) -> bytes | None:
        value = self._values.get(key)
        if value is None:
            return None
        if self._expires[key] <= self._clock():
            del self._values[key], self._expires[key]
            return None
        self._values.move_to_end(key)
        return value

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """``get`` for each key, with one clock reading."""
        values, expires = self._values, self._expires
        now = self._clock()
        out: list[bytes | None] = []
        for key in keys:
            value = values.get(key)
            if value is None:
                out.append(None)
            elif expires[key] <= now:
                del values[key], expires[key]
                out.append(None)
            else:
                values.move_to_end(key)
                out.append(value)
        return out

    def put(self, key: str, value: bytes) -> None:
        self.put_many([key], [value])

    def put_many(self, keys: list[str], values: list[bytes]) -> None:
        """``put`` for each pair, with one clock reading."""
        self.writes += 1
        held, expires = self._values, self._expires
        at = self._clock() + self._ttl
        for key, value in zip(keys, values, strict=True):
            if key in held:
                held.move_to_end(key)
            held[key] = value
            expires[key] = at
        while len(held) > self._max:
            del expires[held.popitem(last=False)[0]]

    def __len__(self) -> int:
        """Entries held (an expired one counts until it is touched or evicted)."""
        return len(self._values)


class RedisCache:
    """The L2 tier over one ``redis.asyncio`` client. Start with ``start()``, end with
    ``aclose()`` (which also closes the client's pool)."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        timeout_s: float,
        ttl_s: int,
        breaker: CircuitBreaker,
        metrics: Metrics,
        write_backlog: int = 10_000,
        secret: bytes | None = None,
    ) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._secret = secret
        self._timeout = timeout_s
        self._ttl = ttl_s
        self._breaker = breaker
        self._metrics = metrics
        self._pending: list[_Lookup] = []
        self._flush_scheduled = False
        self._reads: set[asyncio.Task[None]] = set()
        self._writes: deque[tuple[str, bytes, int]] = deque(maxlen=write_backlog)
        self._write_wake: asyncio.Event | None = None
        self._write_idle: asyncio.Event | None = None  # set while nothing is queued or sending
        self._writer: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._round_trips: deque[float] = deque(maxlen=_ROUND_TRIPS_KEPT)
        self._round_trip: float | None = None  # the least of them (read on every L1 miss)
        self._answered = False  # has Redis answered a call since startup?

    @property
    def status(self) -> Literal["ok", "degraded"]:
        """``ok`` once Redis has answered and while the circuit is closed."""
        return "ok" if self._answered and self._breaker.state == "closed" else "degraded"

    def _succeeded(self) -> None:
        self._breaker.success()
        if not self._answered:
            self._answered = True
            log.info("redis answers: L2 cache in use")

    @property
    def round_trip_s(self) -> float | None:
        """The Redis round trip as this process sees it (seconds; None until one was
        measured): the least of the recent ``PING`` round trips."""
        return self._round_trip

    async def start(self) -> None:
        """Start the background writer and prober, and probe Redis once; a failed probe only
        logs."""
        self._write_wake = asyncio.Event()
        self._write_idle = asyncio.Event()
        self._write_idle.set()
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_loop())
        try:
            await self._ping(self._timeout * 4, timed=False)  # also connects: not a round trip
        except REDIS_FAILURES as exc:
            self._failed(exc)
            log.warning("redis not reachable at startup (%s); serving from L1 + model", exc)
        self._prober = loop.create_task(self._probe_loop())

    async def _ping(self, timeout_s: float, *, timed: bool = True) -> None:
        """One ``PING``, its round trip kept if ``timed``. Raises what the call raises."""
        async with asyncio.timeout(timeout_s):
            await self._client.ping()
            start = time.perf_counter()
            await self._client.ping()
            if timed:
                self._round_trips.append(time.perf_counter() - start)
                self._round_trip = min(self._round_trips)
                self._metrics.redis_round_trip.set(self._round_trip)
        self._succeeded()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(_PROBE_EVERY_S)  # the probing period itself
            if not self._breaker.allow():
                continue
            try:
                await self._ping(self._timeout)
            except REDIS_FAILURES as exc:
                self._failed(exc)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """Values for ``keys`` (None per missing key, ``INVALID`` per value failing its tag),
        or None when Redis was skipped or failed. Merged with the other lookups of this loop
        tick into one ``MGET``."""
        if self._breaker.blocked():
            return None
        values = await self._get_raw(keys)
        if values is None:
            return values
        return [None if v is None else self.unseal(k, v) for k, v in zip(keys, values,
                                                                            strict=True)]

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The Redis client this tier uses (shared by cross-replica coalescing)."""
        return self._client

    @property
    def timeout_s(self) -> float:
        return self._timeout

    def blocked(self) -> bool:
        """Is Redis being skipped now (circuit open)?"""
        return self._breaker.blocked()

    def succeeded(self) -> None:
        """Report a Redis call made outside this tier that was answered."""
        self._succeeded()

    def failed(self, exc: BaseException) -> None:
        """Report a Redis call made outside this tier that failed or timed out."""
        self._failed(exc)

    def seal(self, key: str, value: bytes) -> bytes:
        """``value`` as stored under ``key``: the format byte, its tag over key and value
        (keyed with the secret, if any), the value."""
        return _FORMAT + self._tag(key, value) + value

    def unseal(self, key: str, stored: bytes) -> bytes:
        """The value ``seal`` stored under ``key``, or ``INVALID`` when it is of another
        format or its tag does not verify (stored under another key, corrupted, forged)."""
        if stored[:1] != _FORMAT or len(stored) < _HEAD:
            return INVALID
        tag, value = stored[1:_HEAD], stored[_HEAD:]
        return value if hmac.compare_digest(tag, self._tag(key, value)) else INVALID

    def _tag(self, key: str, value: bytes) -> bytes:
        h = blake2b(key.encode(), key=self._secret or b"", digest_size=_TAG_BYTES)
        h.update(b"\x00")
        h.update(value)
        return h.digest()

    async def _get_raw(self, keys: Sequence[str]) -> list[bytes | None] | None:
        fut: asyncio.Future[list[bytes | None] | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending.append((keys, fut, current.get()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if not self._breaker.allow():
            for _, fut, _ in pending:
                if not fut.done():
                    fut.set_result(None)
            return
        task = asyncio.get_running_loop().create_task(self._mget(pending))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def _mget(self, pending: list[_Lookup]) -> None:
        """One ``MGET`` for the lookups of a tick; with a ``redis MGET`` span linked to each
        sampled request among them."""
        keys = [k for ks, _, _ in pending for k in ks]
        values: list[bytes | None] | None = None
        served = [t for _, _, t in pending if t is not None]
        start = time.time_ns() if served else 0
        try:
            async with asyncio.timeout(self._timeout):
                if self._cluster:  # one MGET per node holding some of the keys
                    values = await self._client.mget_nonatomic(keys)  # type: ignore[union-attr]
                else:
                    values = await self._client.mget(keys)  # type: ignore[assignment]
            self._succeeded()
        except REDIS_FAILURES as exc:
            self._failed(exc)
        except BaseException:  # cancelled (shutdown): the probe slot must not stay taken
            self._breaker.failure()
            raise
        finally:
            at = 0
            for ks, fut, _ in pending:
                end = at + len(ks)
                if not fut.done():
                    fut.set_result(None if values is None else values[at:end])
                at = end
            if served:
                served[0].tracing.record(
                    "redis MGET", start, time.time_ns(), parent=None,
                    links=[t.context for t in served],
                    attributes={"db.system.name": "redis", "db.operation.name": "MGET",
                                "gateway.keys": len(keys), "gateway.requests": len(pending),
                                "gateway.redis.answered": values is not None})

    def put(self, key: str, value: bytes, ttl_s: int | None = None) -> None:
        """Queue one write (``SET key value EX ttl``, the default TTL unless ``ttl_s``);
        never blocks. When the backlog is full the oldest queued write is dropped."""
        self.put_sealed(key, self.seal(key, value), ttl_s)

    def put_sealed(self, key: str, value: bytes, ttl_s: int | None = None) -> None:
        """``put`` of a value already ``seal``-ed."""
        if self._write_wake is None or self._breaker.blocked():
            self._metrics.l2_writes_dropped.inc()
            return
        if len(self._writes) == self._writes.maxlen:
            self._metrics.l2_writes_dropped.inc()
        self._writes.append((key, value, ttl_s or self._ttl))
        self._write_wake.set()
        assert self._write_idle is not None
        self._write_idle.clear()

    async def _write_loop(self) -> None:
        assert self._write_wake is not None and self._write_idle is not None
        while True:
            if not self._writes:
                self._write_idle.set()
                self._write_wake.clear()
                await self._write_wake.wait()
            chunk = [self._writes.popleft() for _ in range(min(_WRITE_CHUNK, len(self._writes)))]
            if not self._breaker.allow():
                self._metrics.l2_writes_dropped.inc(len(chunk))
                continue
            try:
                pipe = self._client.pipeline(transaction=False)
                for key, value, ttl in chunk:
                    pipe.set(key, value, ex=ttl)
                async with asyncio.timeout(self._timeout * 2):
                    await pipe.execute()
                self._succeeded()
            except Exception as exc:  # a client's own defect must not stop every later write
                if not isinstance(exc, REDIS_FAILURES):
                    log.warning("redis write failed unexpectedly: %r", exc, exc_info=True)
                self._failed(exc)
                self._metrics.l2_writes_dropped.inc(len(chunk))

    def _failed(self, exc: BaseException) -> None:
        self._metrics.redis_errors.inc()
        self._breaker.failure()
        log.debug("redis call failed: %r", exc)

    async def flush_writes(self) -> None:
        """Wait until every queued write has been sent or dropped, or the writer has stopped
        (closed). Each write is bounded by the Redis timeout."""
        if self._write_idle is None or self._writer is None:
            return
        idle = asyncio.ensure_future(self._write_idle.wait())
        try:
            await asyncio.wait((idle, self._writer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()

    async def aclose(self) -> None:
        """Stop the writer and pending reads, then close the connection pool (given four
        Redis timeouts; connections still open then are left to the process's end)."""
        tasks = [t for t in (self._writer, self._prober, *self._reads) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(4 * self._timeout):
                await self._client.aclose()
        except TimeoutError:
            log.warning("redis connections not closed within %.1f s", 4 * self._timeout)
