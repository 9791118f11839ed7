"""Cross-replica single-flight: a burst of misses spread over replicas runs the model once.

Plugged into the pipeline's computation (so one request per replica coordinates a key, the
local single-flight merging the rest), for the misses that consult Redis (``gateway.core.sharing``:
those of models whose calls cost more than a Redis round trip).
For a block of keys, one Lua script per Redis slot does, atomically per key:

* the value is in Redis: take it (this is the block's Redis lookup: no ``MGET`` precedes it);
* else ``SET {key}:l token NX PX lease``: this replica won the lease, it computes the key;
* else the key is being computed elsewhere: register this replica's channel in ``{key}:w`` and
  wait.

The holder renews its leases (every third of the lease) while the model runs, then one script
stores the values (``SET EX``, sealed like every L2 value), frees the leases it still holds and
``PUBLISH``-es ``key \\n traceparent \\n value`` to each waiting replica's channel (the
traceparent of the holder's ``model call`` span when that call was traced, else empty: a
waiter's ``lease wait`` span links to it). Every process subscribes to
one channel of its own (one connection, not one per key). A waiter takes a published value only
if its integrity tag (with ``GATEWAY_CACHE_SECRET``) verifies and the model accepts it as one of
its answers (``ModelRunner.decode_value``). A waiter that hears nothing by the end of the lease
asks again: the value is there (a message was lost), the lease was renewed (wait again), or the
lease expired with no value (holder lost or failed) and it takes the lease and computes itself.

Coordination may cost a duplicate model call, never an error or a hang: when Redis is skipped
(circuit open), fails or does not answer within the Redis timeout, the block is computed
locally. Lease keys carry the value key as a hash tag, so each key's three Redis keys share a
slot and the script works on a Redis Cluster (one call per slot).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from gateway.cache import INVALID, RedisCache
from gateway.core.batcher import Failure
from gateway.core.runner import ModelRunner, Unit
from gateway.metrics import Metrics
from gateway.redis_client import REDIS_FAILURES, Packed, bulk, connect_node, listen
from gateway.tracing import current, remote_context, sink, traceparent_of

__all__ = ["BLOCK_LOOP_S", "Lookup", "Remote"]

log = logging.getLogger("gateway.remote")

LocalCompute = Callable[[Unit, np.ndarray], Awaitable[list[bytes | Failure]]]
_Announced = tuple[bytes, bytes]  # (traceparent of the holder's model call or b"", value)

BLOCK_LOOP_S = 300e-6
"""What coordinating one block costs the event loop, at least: its two scripts (built, sent,
read), their futures and the lease bookkeeping. Measured with one new row per request, at
1,500 requests/s on 2 cores: 480-500 µs of the loop's CPU a request with coordination against
110-250 µs without (and 60 µs of redis-server's), see docs/performance.md. ``Sharing`` takes
it as the least a lookup costs: a model answering a lone row for less computes it where it is
missed."""

_LEASE_CALLS = 4.0  # lease = this many average calls or holds (~2 x p99 for a steady model)
_HOLD_ALPHA = 0.2  # weight of the newest hold in its moving average
_MAX_LEASE_S = 30.0
_WAIT_MARGIN_S = 0.01  # past the lease's end before asking again

# Every script: KEYS = value, lease, waiters per key; ARGV = this process's token (also its
# channel), then the key's own arguments.

# Per key: lease ms. Returns per key: the value (bulk), 0 (lease won) or the lease's remaining
# ms (registered as a waiter).
_ACQUIRE = """
local out = {}
for i = 1, #KEYS / 3 do
  local k = 3 * i - 2
  local ms = tonumber(ARGV[1 + i])
  local v = redis.call('GET', KEYS[k])
  if v then
    out[i] = v
  elseif redis.call('SET', KEYS[k + 1], ARGV[1], 'NX', 'PX', ms) then
    out[i] = 0
  else
    redis.call('SADD', KEYS[k + 2], ARGV[1])
    redis.call('PEXPIRE', KEYS[k + 2], ms * 4)
    local ttl = redis.call('PTTL', KEYS[k + 1])
    if ttl < 1 then ttl = 1 end
    out[i] = ttl
  end
end
return out
"""

# Per key: ttl s, value ('' = none: the holder failed), the traceparent of the model call that
# computed it ('' = none). Stores the value, frees the lease if this process holds it, announces
# key, newline, traceparent, newline, value on the channel of each waiter.
_FINISH = """
for i = 1, #KEYS / 3 do
  local k = 3 * i - 2
  local a = 3 * i - 1
  local v = ARGV[a + 1]
  if v ~= '' then redis.call('SET', KEYS[k], v, 'EX', ARGV[a]) end
  if redis.call('GET', KEYS[k + 1]) == ARGV[1] then redis.call('DEL', KEYS[k + 1]) end
  local ws = redis.call('SMEMBERS', KEYS[k + 2])
  if #ws > 0 then
    redis.call('DEL', KEYS[k + 2])
    local msg = KEYS[k] .. '\\n' .. ARGV[a + 2] .. '\\n' .. v
    for _, w in ipairs(ws) do redis.call('PUBLISH', w, msg) end
  end
end
return 0
"""

# Per key: lease ms. Extends the leases this process holds.
_RENEW = """
for i = 1, #KEYS / 3 do
  if redis.call('GET', KEYS[3 * i - 1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[3 * i - 1], ARGV[1 + i])
  end
end
return 0
"""


_LEASE = ":l"  # after "{key}": the lease of value key
_WAITERS = ":w"  # after "{key}": the channels waiting for it


def lease_key(key: str) -> str:
    """The lease of value ``key``: in the same cluster slot (``key`` is its hash tag)."""
    return "{" + key + "}" + _LEASE


def _waiters_key(key: str) -> str:
    return "{" + key + "}" + _WAITERS


# ``bulk`` of the value key, of its ``lease_key`` and of its ``_waiters_key``, in one formatting.
_KEYS_BULK = ("$%d\r\n%b\r\n$%d\r\n{%b}" + _LEASE + "\r\n$%d\r\n{%b}" + _WAITERS
              + "\r\n").encode()


def _redis_keys(key: str) -> bytes:
    """The script KEYS of value ``key`` (the value, its lease, its waiters), as ``bulk``
    strings in one piece, encoded once for the scripts of its block."""
    raw = key.encode()
    n = len(raw)
    return _KEYS_BULK % (n, raw, n + 2 + len(_LEASE), raw, n + 2 + len(_WAITERS), raw)


# (the value key, its ``_redis_keys``, its own script arguments as ``bulk`` strings)
_Item = tuple[str, bytes, bytes]


@dataclass(slots=True)
class Lookup:
    """What a block's first script call found, as its Redis lookup: the positions answered by
    a valid stored value (``stored``), how many stored values were not valid answers
    (``invalid``: computed again), how many keys another replica held the lease of (``held``),
    or that Redis was skipped, failed or late (``skipped``)."""

    stored: list[int] = field(default_factory=list)
    invalid: int = 0
    held: int = 0
    skipped: bool = False


class _Call:
    """Script calls of one loop tick, merged into one call per slot."""

    __slots__ = ("futures", "items", "scheduled")

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.futures: list[tuple[int, int, asyncio.Future[list[Any] | None]]] = []
        self.scheduled = False


class _Watch:
    """The announcements of one script call's keys, from before its reply on: ``got`` holds
    them by key; ``wake`` (made by ``_await``) is set once each of the ``left`` keys it waits
    for has one."""

    __slots__ = ("got", "left", "wake", "wanted")

    def __init__(self) -> None:
        self.got: dict[str, _Announced] = {}
        self.wanted: frozenset[str] = frozenset()
        self.left = 0
        self.wake: asyncio.Future[None] | None = None

    def deliver(self, key: str, announced: _Announced) -> None:
        if key in self.got:
            return
        self.got[key] = announced
        if key in self.wanted:
            self.left -= 1
            if not self.left and self.wake is not None and not self.wake.done():
                self.wake.set_result(None)


class Remote:
    """Cross-replica single-flight over the L2 tier's Redis; see the module docstring.

    ``subscriber()`` makes a Redis client for one subscription to this process's channel
    (blocking reads: no read timeout), closed when the subscription ends; ``slot_of`` maps a
    key to its cluster slot (None: one server).
    Calls made within one loop tick go out as one script call (per slot). Start with
    ``start()``, end with ``aclose()``.
    """

    def __init__(
        self,
        cache: RedisCache,
        subscriber: Callable[[], Any],
        metrics: Metrics,
        *,
        prefix: str,
        lease_min_s: float,
        slot_of: Callable[[str], int] | None = None,
    ) -> None:
        self._cache = cache
        self._client = cache.client
        self._subscriber = subscriber
        self._metrics = metrics
        self._lease_min = lease_min_s
        self._slot_of = slot_of
        self.channel = f"{prefix}:replica:{secrets.token_hex(8)}"  # also this process's token
        self._waiting: dict[str, _Watch | list[_Watch]] = {}  # by key: who listens for it
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._node_clients: dict[str, aioredis.Redis] = {}  # cluster: one per master
        # Per model version: moving average of a lease's hold, won to values stored (seconds).
        self._holds: weakref.WeakKeyDictionary[ModelRunner, float] = weakref.WeakKeyDictionary()
        self._token = bulk(self.channel.encode())
        self._scripts = {name: (self._client.register_script(src), _Call())
                         for name, src in (("acquire", _ACQUIRE), ("finish", _FINISH),
                                           ("renew", _RENEW))}
        self._per_key = {"acquire": 1, "finish": 3, "renew": 1}  # ARGV of each key

    @property
    def subscribed(self) -> bool:
        """Is this process's channel subscribed now (else waiters learn of results by
        asking again when the lease ends)?"""
        return self._subscribed.is_set()

    async def start(self, timeout_s: float) -> None:
        """Load the scripts and start listening on this process's channel, waiting up to
        ``timeout_s`` for each (a Redis that is down only delays them)."""
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            async with asyncio.timeout(timeout_s):
                for script, _ in self._scripts.values():  # loaded (on every master) up front
                    script.sha = await self._client.script_load(script.script)
        except REDIS_FAILURES as exc:
            log.warning("cross-replica coalescing: scripts not loaded yet (%r)", exc)
        try:
            async with asyncio.timeout(timeout_s):
                await self._subscribed.wait()
        except TimeoutError:
            log.warning("cross-replica coalescing: channel not subscribed yet; waiters poll")

    def lease_s(self, runner: ModelRunner) -> float:
        """The lease on a key of ``runner``: 4 average calls (about twice a steady model's
        p99) or 4 average holds (from the lease won to the values stored: the queue before the
        call counts, so a loaded replica's leases seldom need renewing), whichever is longer; at
        least ``lease_min_s``, at most 30 s."""
        longest = max(runner.executor.per_call_s, self._holds.get(runner, 0.0))
        return min(_MAX_LEASE_S, max(self._lease_min, _LEASE_CALLS * longest))

    def _held(self, runner: ModelRunner, seconds: float) -> None:
        old = self._holds.get(runner)
        self._holds[runner] = seconds if old is None else old + _HOLD_ALPHA * (seconds - old)

    # -- the computation -----------------------------------------------------------------------
    async def compute(self, runner: ModelRunner, unit: Unit, keys: Sequence[str],
                      rows: np.ndarray, local: LocalCompute, *,
                      lookup: Lookup | None = None) -> list[bytes | Failure]:
        """Values for ``keys`` (rows ``rows``), computing with ``local`` only the keys whose
        lease this replica won (or whose holder was lost), the others from Redis or from the
        replicas that compute them. The first script call is also the block's Redis lookup
        (a sampled request gets its ``redis lookup`` span), reported in ``lookup``. Raises only
        what ``local`` raises."""
        model = runner.manifest.name
        n = len(keys)
        out: list[bytes | Failure | None] = [None] * n
        lease_ms = int(self.lease_s(runner) * 1000)
        lease = bulk(b"%d" % lease_ms)
        redis_keys = [_redis_keys(k) for k in keys]
        pending = list(range(n))
        waited: set[int] = set()
        first = True
        while pending:
            watch = self._expect([keys[p] for p in pending])
            wait: list[int] = []
            try:
                trace = current.get() if first else None
                start = time.time_ns() if trace is not None else 0
                status = await self._call("acquire", [(keys[p], redis_keys[p], lease)
                                                      for p in pending])
                if status is None:  # Redis skipped, failed or late: this block alone
                    if first and lookup is not None:
                        lookup.skipped = True
                    if trace is not None:
                        trace.child("redis lookup", start, {"gateway.rows": len(pending),
                                                            "gateway.redis.skipped": True})
                    self._metrics.remote_fallbacks.labels(model).inc(len(pending))
                    await self._local(runner, unit, keys, redis_keys, rows, pending, out,
                                      local, [], lease_ms)
                    break
                won: list[int] = []
                unleased: list[int] = []  # a stored value that is not valid: recompute
                longest = 0.0
                coalesced = 0
                hits = 0  # valid values Redis held (on the first call: the block's L2 hits)
                for p, s in zip(pending, status, strict=True):
                    if isinstance(s, bytes):
                        value = self._accept(runner, unit, keys[p], s)
                        if value is None:
                            unleased.append(p)
                            if first and lookup is not None:
                                lookup.invalid += 1
                        else:
                            out[p] = value
                            hits += 1
                            if not first:
                                coalesced += 1
                            elif lookup is not None:
                                lookup.stored.append(p)
                    elif s == 0:
                        won.append(p)
                    else:
                        wait.append(p)
                        longest = max(longest, int(s) / 1000)
                if trace is not None:
                    trace.child("redis lookup", start, {"gateway.rows": len(pending),
                                                        "gateway.l2.hits": hits})
                if first and lookup is not None:
                    lookup.held = len(wait)
                first = False
                if coalesced:
                    self._metrics.remote_coalesced.labels(model).inc(coalesced)
                if won:
                    self._metrics.remote_leases.labels(model).inc(len(won))
                    lost = len(waited.intersection(won))
                    if lost:
                        self._metrics.remote_lease_expiries.labels(model).inc(lost)
                jobs = []
                if won or unleased:
                    jobs.append(self._local(runner, unit, keys, redis_keys, rows, won + unleased,
                                            out, local, won, lease_ms))
                if wait:
                    jobs.append(self._await(runner, unit, keys, wait, watch, out,
                                            longest + _WAIT_MARGIN_S))
                await asyncio.gather(*jobs)
            finally:
                self._unexpect([keys[p] for p in pending], watch)
            waited.update(wait)
            pending = [p for p in pending if out[p] is None]
        return out  # type: ignore[return-value]  # every position is filled above

    async def _local(self, runner: ModelRunner, unit: Unit, keys: Sequence[str],
                     redis_keys: list[bytes], rows: np.ndarray, idx: list[int],
                     out: list[bytes | Failure | None], local: LocalCompute, leased: list[int],
                     lease_ms: int) -> None:
        """Compute ``idx`` here, renewing the leases of ``leased`` meanwhile. Returns as soon as
        the values are in ``out``: storing, freeing and announcing the leased ones (one script)
        goes on in the background, as do the writes of the others, so the caller's answer does
        not wait for Redis a second time."""
        sub = rows if len(idx) == len(rows) else rows[idx]
        ttl = runner.cache_ttl_s
        ttl_arg = bulk(b"%d" % ttl)
        renew = None
        won_at = time.monotonic()
        if leased:
            lease = bulk(b"%d" % lease_ms)
            renew = asyncio.get_running_loop().create_task(self._renew_loop(
                [(keys[p], redis_keys[p], lease) for p in leased], lease_ms))
        spans: list[Any] = []  # the traced model calls' contexts (tracing.sink)
        to = sink.set(spans) if leased and current.get() is not None else None
        try:
            results = await local(unit, sub)
        except BaseException:
            if leased:  # free the leases: the waiters ask again and compute themselves
                none = ttl_arg + bulk(b"") + bulk(b"")
                self._spawn(self._call("finish", [(keys[p], redis_keys[p], none)
                                                  for p in leased]))
            raise
        finally:
            if renew is not None:
                renew.cancel()
            if to is not None:
                sink.reset(to)
        parent = bulk(traceparent_of(spans[0]).encode() if spans else b"")
        values: dict[int, bytes] = {}
        for p, value in zip(idx, results, strict=True):
            out[p] = value
            if type(value) is bytes:
                values[p] = value
        if leased:
            seal = self._cache.seal
            self._spawn(self._finish(runner, won_at, [
                (keys[p], redis_keys[p],
                 ttl_arg + bulk(seal(keys[p], values[p]) if p in values else b"") + parent)
                for p in leased], keys, leased, values, ttl))
        mine = set(leased)
        for p, value in values.items():
            if p not in mine:
                self._cache.put(keys[p], value, ttl)

    async def _finish(self, runner: ModelRunner, won_at: float, items: list[_Item],
                      keys: Sequence[str], leased: list[int], values: dict[int, bytes],
                      ttl: int) -> None:
        """Store, free and announce the ``leased`` keys (``items``); where the script fails,
        their ``values`` are written as any others are."""
        done = await self._call("finish", items)
        self._held(runner, time.monotonic() - won_at)
        if done is None:
            for p in leased:
                if p in values:
                    self._cache.put(keys[p], values[p], ttl)

    async def _renew_loop(self, items: list[_Item], lease_ms: int) -> None:
        while True:
            await asyncio.sleep(lease_ms / 3000)  # the renewal period itself
            await self._call("renew", items)

    async def _await(self, runner: ModelRunner, unit: Unit, keys: Sequence[str],
                     wait: list[int], watch: _Watch, out: list[bytes | Failure | None],
                     timeout_s: float) -> None:
        """Values announced (to ``watch``) for the keys at ``wait`` within ``timeout_s``; the
        rest stay None. A sampled request gets a ``lease wait`` span, linked to the holders'
        ``model call`` spans."""
        trace = current.get()
        start = time.time_ns() if trace is not None else 0
        wanted = frozenset(keys[p] for p in wait)
        watch.wanted = wanted
        watch.left = len(wanted - watch.got.keys())
        if watch.left:
            wake = watch.wake = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await wake
            except TimeoutError:
                pass
        got = 0
        parents: set[bytes] = set()
        for p in wait:
            announced = watch.got.get(keys[p])
            if announced is not None:
                parent, stored = announced
                value = self._accept(runner, unit, keys[p], stored)
                if value is not None:
                    out[p] = value
                    got += 1
                    if parent:
                        parents.add(parent)
        if got:
            self._metrics.remote_coalesced.labels(runner.manifest.name).inc(got)
        if trace is not None:
            links = [c for c in map(remote_context, sorted(parents)) if c is not None]
            trace.child("lease wait", start, {"gateway.rows": len(wait),
                                              "gateway.rows.announced": got}, links)

    def _accept(self, runner: ModelRunner, unit: Unit, key: str, stored: bytes) -> bytes | None:
        """A value from another replica if it verifies and is one of the model's answers."""
        if not stored:
            return None
        value = self._cache.unseal(key, stored)
        if value is INVALID:
            return None
        return runner.decode_value(unit, value)

    # -- waiting for announcements -------------------------------------------------------------
    def _expect(self, keys: list[str]) -> _Watch:
        """A watch of ``keys``' announcements on this process's channel, until ``_unexpect``."""
        watch = _Watch()
        waiting = self._waiting
        for key in keys:
            other = waiting.setdefault(key, watch)
            if other is not watch:  # another block of this process listens for it too
                waiting[key] = [*other, watch] if isinstance(other, list) else [other, watch]
        return watch

    def _unexpect(self, keys: list[str], watch: _Watch) -> None:
        waiting = self._waiting
        for key in keys:
            listening = waiting.get(key)
            if listening is watch:
                del waiting[key]
            elif isinstance(listening, list):
                rest = [w for w in listening if w is not watch]
                if len(rest) > 1:
                    waiting[key] = rest
                elif rest:
                    waiting[key] = rest[0]
                else:
                    del waiting[key]
        if watch.wake is not None and not watch.wake.done():
            watch.wake.cancel()

    def _deliver(self, data: bytes) -> None:
        key_bytes, sep, rest = data.partition(b"\n")
        parent, sep2, value = rest.partition(b"\n")
        if not sep or not sep2:
            return
        key = key_bytes.decode("utf-8", "replace")
        listening = self._waiting.get(key)
        if isinstance(listening, _Watch):
            listening.deliver(key, (parent, value))
        elif listening is not None:
            for watch in listening:
                watch.deliver(key, (parent, value))

    async def _listen(self) -> None:
        await listen(self._subscriber, self.channel, self._deliver, self._subscribed)

    # -- Redis calls -------------------------------------------------------------------------
    async def _call(self, name: str, items: list[_Item]) -> list[Any] | None:
        """Script ``name`` for ``items`` (key, its Redis keys, its arguments): one result per
        key, or None when Redis is skipped, fails or is late. Merged with the calls of this
        loop tick."""
        if self._cache.blocked():
            return None
        _, call = self._scripts[name]
        fut: asyncio.Future[list[Any] | None] = asyncio.get_running_loop().create_future()
        start = len(call.items)
        call.items.extend(items)
        call.futures.append((start, len(call.items), fut))
        if not call.scheduled:
            call.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, name)
        return await fut

    def _flush(self, name: str) -> None:
        script, call = self._scripts[name]
        self._scripts[name] = (script, _Call())
        self._spawn(self._run(script, call, self._per_key[name]))

    async def _run(self, script: Any, call: _Call, per_key: int) -> None:
        items = call.items
        groups: dict[int, list[int]] = {}
        if self._slot_of is None:
            groups[0] = list(range(len(items)))
        else:
            for i, (key, _, _) in enumerate(items):
                groups.setdefault(self._slot_of(key), []).append(i)

        calls = []  # per slot: EVALSHA's arguments after the sha
        for idx in groups.values():
            n = len(idx)
            calls.append((3 * n, Packed(b"".join([items[i][1] for i in idx]), 3 * n),
                          Packed(self._token + b"".join([items[i][2] for i in idx]),
                                 1 + per_key * n)))

        results: list[Any] | None = None
        try:
            async with asyncio.timeout(self._cache.timeout_s):
                if self._slot_of is None:
                    replies = [await self._evalsha(self._client, script, calls[0])]
                else:
                    replies = await self._per_node(script, list(groups), calls)
            self._cache.succeeded()
            results = [None] * len(call.items)
            for idx, reply in zip(groups.values(), replies, strict=True):
                if isinstance(reply, list):
                    for i, r in zip(idx, reply, strict=True):
                        results[i] = r
        except REDIS_FAILURES as exc:
            self._cache.failed(exc)
        finally:
            for start, end, fut in call.futures:
                if not fut.done():
                    fut.set_result(None if results is None else results[start:end])

    @staticmethod
    async def _evalsha(client: Any, script: Any, args: tuple[int, Packed, Packed]) -> Any:
        """``script`` with ``args`` (numkeys, keys, argv), loaded first if Redis lacks it."""
        try:
            return await client.evalsha(script.sha, *args)
        except NoScriptError:
            script.sha = await client.script_load(script.script)
            return await client.evalsha(script.sha, *args)

    async def _per_node(self, script: Any, slots: list[int],
                        calls: list[tuple[int, Packed, Packed]]) -> list[Any]:
        """One script call per slot, sent as one pipeline per cluster master (as the cluster
        client's slot map has it; the cache's own calls keep that map current)."""
        by_node: dict[str, list[int]] = {}
        nodes: dict[str, Any] = {}
        for j, slot in enumerate(slots):
            node = self._client.nodes_manager.get_node_from_slot(slot)  # type: ignore[union-attr]
            by_node.setdefault(node.name, []).append(j)
            nodes[node.name] = node
        replies: list[Any] = [None] * len(calls)

        async def send(name: str, js: list[int]) -> None:
            client = self._node_clients.get(name)
            if client is None:
                client = self._node_clients[name] = connect_node(
                    nodes[name].host, int(nodes[name].port),
                    connect_timeout_s=max(self._cache.timeout_s, 1.0))
            for attempt in (0, 1):
                pipe = client.pipeline(transaction=False)
                for j in js:
                    pipe.evalsha(script.sha, *calls[j])
                try:
                    out = await pipe.execute()
                    break
                except NoScriptError:
                    if attempt:
                        raise
                    await client.script_load(script.script)
            for j, reply in zip(js, out, strict=True):
                replies[j] = reply

        await asyncio.gather(*(send(name, js) for name, js in by_node.items()))
        return replies

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Let the scripts under way end (each is bounded by the cache's timeout; leases
        stored, freed and announced in the background among them), then stop."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=4 * self._cache.timeout_s)
        tasks = [t for t in (self._listener, *self._background) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in self._node_clients.values():
            await client.aclose()
