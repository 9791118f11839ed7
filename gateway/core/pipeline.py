"""The one prediction path, on whole blocks of rows: keys -> L1 -> L2 -> single-flight ->
micro-batcher -> model.

``Pipeline.begin`` takes the requests that arrived together (one, or all those of one
event-loop step) and answers what needs no waiting; ``Pipeline.finish`` completes the rest, one
request at a time, or ``Pipeline.finish_many`` a group of them (``Pipeline.together``) as one
block.
Together they answer a matrix of validated rows for one model version with one encoded JSON
value per row and output, computing only the rows no tier holds, each at most once at a time,
in as few model calls as the load allows. A request's missing rows travel as one block: keys
already in flight are joined, the rest are owned by one computation that submits them to the
batcher as one entry and stores the results in L1 before its keys are freed (Redis is written
in the background). Whether a block's misses are looked up in Redis is ``Sharing``'s decision
(a call dearer than a Redis round trip). Misses that skip Redis, of a model measured to answer
in microseconds, are answered by one inline call on the spot, which costs less than the
coordination it replaces; misses looked up in Redis always take the single-flight (other
requests ran during the lookup). With a ``Remote``, a block that consults Redis goes from L1
straight to the single-flight, whose computation coordinates its keys with the other replicas
(cross-replica single-flight, ``gateway.remote``): the lease script is its Redis lookup (one
round trip rather than an ``MGET`` and then the script), and the coordination also stores the
values in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gateway.cache import L1Cache, RedisCache
from gateway.core.batcher import Failure
from gateway.core.keys import canonical_rows, key_head, row_keys
from gateway.core.runner import SEP, ModelRunner, Output, Unit
from gateway.core.sharing import Sharing
from gateway.core.singleflight import SingleFlight
from gateway.errors import DeadlineExceeded, GatewayError, InvalidInput
from gateway.metrics import Metrics
from gateway.remote import Lookup, Remote
from gateway.tracing import Call, Traced, calls, current

__all__ = ["Answer", "Pending", "Pipeline", "Source"]

log = logging.getLogger("gateway.pipeline")

Source = Literal["l1", "l2", "miss"]
_RANK: dict[str, int] = {"l1": 0, "l2": 1, "miss": 2}
_INVALID_LOG_EVERY_S = 10.0
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(slots=True)
class Answer:
    """Per output, one JSON value (bytes) per row; per row, where it came from."""

    values: dict[Output, list[bytes]]
    sources: list[Source]

    @property
    def source(self) -> Source:
        """The slowest tier any row came from (``miss`` if the model ran for any)."""
        sources = self.sources
        return "miss" if "miss" in sources else "l2" if "l2" in sources else "l1"


@dataclass(eq=False, slots=True)
class Pending:
    """What ``Pipeline.begin`` could not answer without waiting, for ``Pipeline.finish``."""

    runner: ModelRunner
    blocks: list[_Block]
    l1_writes: int  # L1's write count when the blocks were looked up


@dataclass(eq=False, slots=True)
class _Block:
    """One unit of work for one request's rows, while it is being answered."""

    unit: Unit
    rows: np.ndarray
    keys: list[str] | None
    values: list[bytes | None]
    sources: list[Source]
    missing: list[int]
    use_l2: bool
    recheck: bool = False  # may a computation have stored some of its rows since the lookup?
    trace: Traced | None = None  # the request's, when it is sampled


class Pipeline:
    """Shared by all models of one app; see the module docstring."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        prefix: str,
        l1: L1Cache | None,
        l2: RedisCache | None,
        coalesce: bool,
        sharing: Sharing | None = None,
        remote: Remote | None = None,
    ) -> None:
        """``sharing`` decides when ``l2`` is consulted (without one: always)."""
        self._metrics = metrics
        self._prefix = prefix
        self._l1 = l1
        self._l2 = l2
        self._sharing = sharing
        self._remote = remote
        self._flights: SingleFlight[str, bytes | Failure] | None = (
            SingleFlight(abandon=True) if coalesce else None
        )
        self._heads: dict[tuple[int, Unit], str] = {}
        self._waiting = 0  # requests inside a single-flight call now
        self._l1_hit = metrics.cache_lookups.labels("l1", "hit")
        self._l1_miss = metrics.cache_lookups.labels("l1", "miss")
        self._l2_hit = metrics.cache_lookups.labels("l2", "hit")
        self._l2_miss = metrics.cache_lookups.labels("l2", "miss")
        self._l2_error = metrics.cache_lookups.labels("l2", "error")
        self._l2_invalid = metrics.cache_lookups.labels("l2", "invalid")
        self._invalid_logged_at = -_INVALID_LOG_EVERY_S
        self._tally = metrics.tally

    def waiting(self) -> int:
        """Requests waiting on an in-flight computation now (0 without coalescing); the
        requests of a group (``finish_many``) count one each."""
        return self._waiting

    def begin(self, requests: list[tuple[ModelRunner, np.ndarray, frozenset[Output]]],
              traces: list[Traced | None] | None = None) -> list[Answer | Pending | GatewayError]:
        """Everything about the requests' rows (float64, validated) that needs no waiting:
        keys, L1, and the inline call of a model measured to answer in microseconds. One
        result per request, in order: its answer if that was all; else what ``finish`` needs
        to complete it (await ``finish`` for it, or drop it: nothing is registered anywhere
        until ``finish`` runs); or the InvalidInput of a value beyond float32 range (tree models
        compare in float32), returned rather than raised.

        The requests are those that arrived together (one event-loop step, or one request):
        the rows they miss of one model version and unit go to the model in one inline call,
        each distinct key once (with batching off, one call per request, and a row an earlier
        request of the step computed is taken from L1).

        ``traces`` (tracing on): per request, its sampled trace or None; a sampled request that
        misses gets an ``l1 lookup`` span, and the inline call a ``model call`` span linked to it.
        """
        out: list[Answer | Pending | GatewayError] = []
        inline: dict[tuple[int, Unit], tuple[ModelRunner, list[_Block]]] = {}
        traced = None if traces is None else iter(traces)
        for runner, rows, outputs in requests:
            trace = None if traced is None else next(traced)
            try:
                blocks = (self._look_up(runner, rows, outputs) if trace is None
                          else self._traced_look_up(trace, runner, rows, outputs))
            except GatewayError as exc:
                out.append(exc)
                continue
            if not any(b.missing for b in blocks):
                out.append(_answer(blocks))
                continue
            out.append(Pending(runner, blocks, self._l1.writes if self._l1 is not None else 0))
            for b in blocks:
                if b.missing and not b.use_l2:
                    inline.setdefault((id(runner), b.unit), (runner, []))[1].append(b)
        if not inline:
            return out
        for runner, blocks in inline.values():
            self._answer_inline(runner, blocks)
        for i, result in enumerate(out):
            if type(result) is Pending and not any(b.missing for b in result.blocks):
                out[i] = _answer(result.blocks)
        return out

    def _traced_look_up(self, trace: Traced, runner: ModelRunner, rows: np.ndarray,
                        outputs: frozenset[Output]) -> list[_Block]:
        """``_look_up`` with its ``l1 lookup`` span when some row missed (a request L1 answers
        whole needs none: its own span says where its rows came from); the blocks carry the
        trace."""
        start = time.time_ns()
        blocks = self._look_up(runner, rows, outputs)
        missed = sum(len(b.missing) for b in blocks)
        if missed:
            trace.child("l1 lookup", start, {"gateway.rows": len(rows),
                                             "gateway.l1.hits": len(rows) - missed})
        for b in blocks:
            b.trace = trace
        return blocks

    def _look_up(self, runner: ModelRunner, rows: np.ndarray, outputs: frozenset[Output]
                 ) -> list[_Block]:
        """One request's blocks (one per unit), looked up in L1; whether each is looked up in
        Redis is decided. Raises InvalidInput (out of float32 range)."""
        rows = canonical_rows(rows)
        units = runner.units(outputs)
        keys: list[str] | None = None
        if len(rows) == 1 and len(units) == 1 and self._l1 is not None:  # the hot path
            unit = units[0]
            keys = row_keys(self._head(runner, unit), rows)
            value = self._l1.get(keys[0])
            if value is not None:
                self._tally.inc(self._l1_hit)
                return [_Block(unit, rows, keys, [value], ["l1"], [], False)]
            self._tally.inc(self._l1_miss)
        if _out_of_range(rows):  # (a cached row passed this before)
            raise InvalidInput(f"feature values must be within ±{_FLOAT32_MAX:.7g} (float32 "
                               "range, in which tree models compare)", code="out_of_range")
        if keys is not None:  # looked up above: the one unit's row missed L1
            return [self._start(runner, units[0], rows, keys=keys)]
        return [self._start(runner, unit, rows) for unit in units]

    def _joined_in_step(self, runner: ModelRunner, block: _Block) -> None:
        """Take the block's missing rows that another request of this step has computed
        since its lookup (they are in L1 now): coalesced, not computed again."""
        keys = block.keys
        if self._l1 is None or keys is None:
            return
        still = []
        for i, value in zip(block.missing, self._l1.get_many([keys[i] for i in block.missing]),
                            strict=True):
            if value is None:
                still.append(i)
            else:
                block.values[i] = value
        if len(still) < len(block.missing):
            self._metrics.coalesced.labels(runner.manifest.name).inc(
                len(block.missing) - len(still))
            block.missing = still

    def _answer_inline(self, runner: ModelRunner, blocks: list[_Block]) -> None:
        """Answer the blocks' missing rows (one unit of ``runner``) by inline calls when those
        are measured to be tiny: one call for them all (with batching off, one call per block),
        each distinct key once with coalescing on. Nothing else runs meanwhile, so the values
        are in L1 before any other request looks: single-flight and batching would be pure
        overhead here. A block with a row being computed already, or whose call was not made
        or failed, is left missing: it takes the single-flight and batcher path (which also
        isolates a row the model refuses)."""
        if runner.batcher is not None:
            self._inline_call(runner, blocks)
            return
        for n, block in enumerate(blocks):
            if n and self._flights is not None:
                self._joined_in_step(runner, block)  # rows an earlier block computed
            if block.missing:
                self._inline_call(runner, [block])

    def _inline_call(self, runner: ModelRunner, blocks: list[_Block]) -> None:
        """One inline call (in pieces of at most ``max_batch_size`` rows) for the blocks'
        missing rows; see ``_answer_inline``."""
        flights = self._flights
        busy = flights if flights is not None and len(flights) else None
        at_key: dict[str, int] = {}  # key -> its row in the call (coalescing)
        where: list[tuple[_Block, int, int]] = []  # (block, row in block, row in call)
        parts: list[np.ndarray] = []
        for block in blocks:
            keys = block.keys
            if keys is not None and busy is not None and any(keys[i] in busy
                                                             for i in block.missing):
                continue  # join the computation under way instead
            for i in block.missing:
                at = at_key.get(keys[i]) if keys is not None and flights is not None else None
                if at is None:
                    at = len(parts)
                    parts.append(block.rows[i])
                    if keys is not None and flights is not None:
                        at_key[keys[i]] = at
                where.append((block, i, at))
        step = runner.max_batch_size
        if not parts or not runner.executor.inline_for(min(step, len(parts))):
            return  # (its first piece would not run inline: the rows take the batcher)
        computed: list[bytes | None] = []
        rows = blocks[0].rows if len(blocks) == 1 and len(parts) == len(blocks[0].rows) \
            else np.stack(parts)
        served = [b.trace for b in blocks if b.trace is not None]
        traced = calls.set(Call(served, [])) if served else None
        try:
            for start in range(0, len(rows), step):
                piece = rows[start:start + step]
                # (the first piece was judged above; a call may have changed the measures since)
                got = runner.try_inline(blocks[0].unit, piece) if not start \
                    or runner.executor.inline_for(len(piece)) else None
                computed += got if got is not None else [None] * len(piece)
        finally:
            if traced is not None:
                calls.reset(traced)
        failed = {id(b) for b, _, at in where if computed[at] is None}
        stored: dict[str, bytes] = {}
        for block, i, at in where:
            if id(block) in failed:
                continue
            value = computed[at]
            assert value is not None
            block.values[i] = value
            if block.keys is not None:
                stored[block.keys[i]] = value
        for block in {id(b): b for b, _, _ in where if id(b) not in failed}.values():
            block.missing = []
        if self._l1 is not None and stored:
            self._l1.put_many(list(stored), list(stored.values()))

    async def finish(self, pending: Pending, timeout_s: float) -> Answer:
        """Complete what ``begin`` left: L2, then the model, under the ``timeout_s``
        deadline.

        Raises:
            DeadlineExceeded: no complete answer within ``timeout_s``.
            Overloaded: the model's queue has no room now.
            TooManyRows: more uncached rows than the queue may ever hold (413).
            Unavailable: shutting down.
            ModelFailed: the model raised for one of the rows.
        Cancelling it (deadline, client gone) drops its rows that nobody else waits for.
        """
        runner, blocks = pending.runner, pending.blocks
        waiting = [b for b in blocks if b.missing]
        if len(waiting) > 1 or (self._l1 is not None and self._l1.writes != pending.l1_writes):
            for b in waiting:  # others may store rows between the lookup and the flight
                b.recheck = True
        try:
            async with asyncio.timeout(timeout_s):
                if len(waiting) == 1:
                    failed = [await self._fill(runner, waiting[0])]
                else:
                    failed = await asyncio.gather(*(self._fill(runner, b) for b in waiting))
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within {timeout_s * 1000:.0f} ms") from None
        refused = next((f for failures in failed for f in failures.values()), None)
        if refused is not None:
            raise runner.failed(refused)
        return _answer(blocks)

    def together(self, pendings: list[Pending]) -> list[list[int]]:
        """``pendings`` (begun together) in the groups ``finish_many`` completes as one, by
        their positions: those of one model version whose waiting blocks have the same units
        and Redis use, up to ``max_batch_size`` missing rows a group (one batcher entry). A
        pending with more missing rows, or without keys to merge by, is a group alone; so is
        every pending with coalescing off or of a model without batching (merging would
        coalesce and batch them)."""
        groups: list[list[int]] = []
        open_: dict[Hashable, tuple[list[int], int]] = {}  # signature -> (group, rows)
        for n, pending in enumerate(pendings):
            waiting = [b for b in pending.blocks if b.missing]
            rows = sum(len(b.missing) for b in waiting)
            limit = pending.runner.max_batch_size
            if (self._flights is None or pending.runner.batcher is None or rows > limit
                    or any(b.keys is None for b in waiting)):
                groups.append([n])
                continue
            signature = (id(pending.runner), *((b.unit, b.use_l2) for b in waiting))
            found = open_.get(signature)
            if found is not None and found[1] + rows <= limit:
                found[0].append(n)
                open_[signature] = (found[0], found[1] + rows)
                continue
            group = [n]
            groups.append(group)
            open_[signature] = (group, rows)
        return groups

    async def finish_many(self, pendings: list[Pending], timeout_s: float
                          ) -> list[Answer | GatewayError | Failure]:
        """Complete one group of ``together`` as one: per unit, the pendings' waiting blocks
        merged into one block (each distinct key once; a key several of them miss counts as
        coalesced), so the group costs one single-flight call and one batcher entry rather
        than one each. Per pending, in order, its answer; or the error ``finish`` would raise
        for it (the deadline, a full queue, shutdown: the whole group); or, for a request
        holding a row the model failed on, that row's Failure, whose error is
        ``runner.failed(failure)`` (which logs it: call it in the request's context).
        Cancelling it drops the group's rows nobody else waits for. A group of one is
        ``finish``."""
        if len(pendings) == 1:
            try:
                return [await self.finish(pendings[0], timeout_s)]
            except GatewayError as exc:
                return [exc]
        runner = pendings[0].runner
        waiting = [[b for b in p.blocks if b.missing] for p in pendings]
        recheck = len(waiting[0]) > 1 or (self._l1 is not None and any(
            self._l1.writes != p.l1_writes for p in pendings))
        merged = [_merged([w[j] for w in waiting], recheck) for j in range(len(waiting[0]))]
        try:
            async with asyncio.timeout(timeout_s):
                if len(merged) == 1:
                    failed = [await self._fill(runner, merged[0][0], len(pendings))]
                else:
                    failed = await asyncio.gather(*(self._fill(runner, b, len(pendings))
                                                    for b, _ in merged))
        except TimeoutError:
            return [DeadlineExceeded(f"no answer within {timeout_s * 1000:.0f} ms")] * len(
                pendings)
        except GatewayError as exc:
            return [exc] * len(pendings)
        shared = sum(len(at) for block, ats in merged for at in ats) - sum(
            len(block.rows) for block, _ in merged)
        if shared:
            self._metrics.coalesced.labels(runner.manifest.name).inc(shared)
        out: list[Answer | GatewayError | Failure] = []
        for n, pending in enumerate(pendings):
            failure: Failure | None = None
            for (block, ats), failures, own in zip(merged, failed, waiting[n], strict=True):
                for i, at in zip(own.missing, ats[n], strict=True):
                    if at in failures:
                        failure = failure or failures[at]
                        continue
                    own.values[i] = block.values[at]
                    own.sources[i] = block.sources[at]
            out.append(_answer(pending.blocks) if failure is None else failure)
        return out

    def _start(self, runner: ModelRunner, unit: Unit, rows: np.ndarray, *,
               keys: list[str] | None = None) -> _Block:
        """A block for ``rows``: keys, L1 (unless ``keys`` are given: looked up already), and
        whether its misses are looked up in Redis."""
        n = len(rows)
        looked_up = keys is not None
        if keys is None and (self._l1 is not None or self._flights is not None):
            keys = row_keys(self._head(runner, unit), rows)
        block = _Block(unit, rows, keys, [None] * n, ["miss"] * n, list(range(n)), False)
        if self._l1 is not None and keys is not None and not looked_up:
            self._from_l1(block)
        if self._l2 is not None and keys is not None and block.missing:
            sharing = self._sharing
            block.use_l2 = sharing is None or sharing.consult(runner, len(block.missing))
        return block

    def _head(self, runner: ModelRunner, unit: Unit) -> str:
        head = self._heads.get((id(runner), unit))
        if head is None:
            m = runner.manifest
            head = self._heads[(id(runner), unit)] = key_head(
                self._prefix, m.name, m.digest, runner.unit_tag(unit))
        return head

    def forget(self, runner: ModelRunner) -> None:
        """Drop what was memoized for ``runner`` (its model version was unloaded)."""
        for k in [k for k in self._heads if k[0] == id(runner)]:
            del self._heads[k]
        if self._sharing is not None:
            self._sharing.forget(runner)

    def _from_l1(self, block: _Block) -> None:
        assert self._l1 is not None and block.keys is not None
        missing = []
        values = block.values
        for i, v in enumerate(self._l1.get_many(block.keys)):
            if v is None:
                missing.append(i)
            else:
                values[i] = v
                block.sources[i] = "l1"
        hits = len(block.keys) - len(missing)
        if missing:
            self._tally.inc(self._l1_miss, len(missing))
        if hits:
            self._tally.inc(self._l1_hit, hits)
        block.missing = missing

    async def _fill(self, runner: ModelRunner, block: _Block, requests: int = 1
                    ) -> dict[int, Failure]:
        """L2, then the model, for the block's missing rows (of ``requests`` requests); the
        rows the model failed on, by position in the block, are returned (their values are
        left None)."""
        if block.use_l2:
            # Other requests ran during the lookup: what they computed is found by the
            # computation's L1 recheck, what they compute now is joined by the single-flight,
            # and other replicas are coordinated with; never an inline call of its own.
            block.recheck = True
            if self._remote is None:  # else the lease script looks the values up itself
                await self._from_l2(runner, block)
                if not block.missing:
                    return {}
        missing = block.missing
        keys = block.keys
        if self._flights is None or keys is None:
            computed = await self._compute(runner, block, missing)
        else:
            trace = current.get()
            start = time.time_ns() if trace is not None else 0
            self._waiting += requests
            try:
                computed, shared = await self._flights.do(
                    [keys[i] for i in missing],
                    lambda positions: self._compute(runner, block,
                                                    [missing[p] for p in positions]))
            finally:
                self._waiting -= requests
            if shared:
                self._metrics.coalesced.labels(runner.manifest.name).inc(shared)
                if trace is not None:
                    trace.child("singleflight wait", start, {
                        "gateway.rows": len(missing), "gateway.rows.shared": shared})
        failed: dict[int, Failure] = {}
        for i, value in zip(missing, computed, strict=True):
            if isinstance(value, Failure):
                failed[i] = value
            else:
                block.values[i] = value
        return failed

    async def _compute(self, runner: ModelRunner, block: _Block, idx: list[int]
                       ) -> list[bytes | Failure]:
        """Values for ``block.rows[idx]``, stored in the cache tiers before returning."""
        out: list[bytes | Failure | None] = [None] * len(idx)
        todo = list(range(len(idx)))
        keys = block.keys
        if self._l1 is not None and keys is not None and block.recheck:
            # Stored by a computation that ended after this request's L1 lookup. (Unless the
            # request awaited something since, nothing ran in between.)
            todo = []
            for j, v in enumerate(self._l1.get_many([keys[i] for i in idx])):
                if v is None:
                    todo.append(j)
                else:
                    out[j] = v
        if todo:
            sel = [idx[j] for j in todo]
            sub = block.rows if len(sel) == len(block.rows) else block.rows[sel]
            remote = self._remote if block.use_l2 and keys is not None else None
            if remote is not None and keys is not None:
                lookup = Lookup()
                results = await remote.compute(runner, block.unit, [keys[i] for i in sel], sub,
                                               runner.compute, lookup=lookup)
                self._looked_up(runner, block, sel, lookup)
            else:
                results = await runner.compute(block.unit, sub)
            done_keys: list[str] = []
            done: list[bytes] = []
            for j, value in zip(todo, results, strict=True):
                out[j] = value
                if keys is not None and type(value) is bytes:
                    done_keys.append(keys[idx[j]])
                    done.append(value)
            if done:
                if remote is None:
                    self._put_many(block, done_keys, done, runner.cache_ttl_s)
                elif self._l1 is not None:  # Redis is written by the coordination
                    self._l1.put_many(done_keys, done)
        return out  # type: ignore[return-value]  # every position is filled above

    def _put_many(self, block: _Block, keys: list[str], values: list[bytes],
                  ttl_s: int) -> None:
        if self._l1 is not None:
            self._l1.put_many(keys, values)
        if self._l2 is not None and block.use_l2:
            put = self._l2.put
            for key, value in zip(keys, values, strict=True):
                put(key, value, ttl_s)

    async def _from_l2(self, runner: ModelRunner, block: _Block) -> None:
        assert self._l2 is not None and block.keys is not None
        keys = block.keys
        missing = block.missing
        trace = current.get()
        start = time.time_ns() if trace is not None else 0
        raw = await self._l2.get_many([keys[i] for i in missing])
        if raw is None:
            self._tally.inc(self._l2_error, len(missing))
            if trace is not None:
                trace.child("redis lookup", start, {"gateway.rows": len(missing),
                                                    "gateway.redis.skipped": True})
            return
        still = []
        invalid = 0
        found_keys: list[str] = []
        found: list[bytes] = []
        for i, blob in zip(missing, raw, strict=True):
            value = None if blob is None else runner.decode_value(block.unit, blob)
            if value is None:
                still.append(i)
                invalid += blob is not None
                continue
            block.values[i] = value
            block.sources[i] = "l2"
            found_keys.append(keys[i])
            found.append(value)
        if self._l1 is not None and found:
            self._l1.put_many(found_keys, found)
        self._count_l2(runner, len(missing), len(missing) - len(still), invalid)
        block.missing = still
        if trace is not None:
            trace.child("redis lookup", start, {"gateway.rows": len(missing),
                                                "gateway.l2.hits": len(missing) - len(still)})

    def _looked_up(self, runner: ModelRunner, block: _Block, sel: list[int],
                   lookup: Lookup) -> None:
        """Count the Redis lookup a lease script made for rows ``sel`` of ``block``, as
        ``_from_l2`` counts an ``MGET``."""
        if lookup.skipped:
            self._tally.inc(self._l2_error, len(sel))
            return
        for p in lookup.stored:
            block.sources[sel[p]] = "l2"
        self._count_l2(runner, len(sel), len(lookup.stored), lookup.invalid, lookup.held)

    def _count_l2(self, runner: ModelRunner, rows: int, hits: int, invalid: int,
                  held: int = 0) -> None:
        """Tally a Redis lookup of ``rows`` rows: ``hits`` valid values, ``invalid`` stored
        values that are not valid answers, the rest misses (``held`` of them being computed by
        another replica); and tell ``Sharing`` how many Redis answered."""
        if self._sharing is not None:
            self._sharing.looked_up(runner, rows, hits + held)
        if hits:
            self._tally.inc(self._l2_hit, hits)
        if invalid:
            self._invalid(runner, invalid)
        misses = rows - hits - invalid
        if misses:
            self._tally.inc(self._l2_miss, misses)

    def _invalid(self, runner: ModelRunner, count: int) -> None:
        self._tally.inc(self._l2_invalid, count)
        now = time.monotonic()
        if now - self._invalid_logged_at >= _INVALID_LOG_EVERY_S:
            self._invalid_logged_at = now
            log.warning("redis held %d value(s) that are not valid answers of model %s v%s "
                        "(or fail the integrity tag): treated as misses", count,
                        runner.manifest.name, runner.manifest.version)

    async def aclose(self) -> None:
        if self._flights is not None:
            await self._flights.aclose()


def _out_of_range(rows: np.ndarray) -> bool:
    """Is any value beyond float32 range? (Python's own loop is quicker on a few values.)"""
    if rows.size <= 16:
        return bool(max(map(abs, rows.ravel().tolist())) > _FLOAT32_MAX)
    return float(np.abs(rows).max()) > _FLOAT32_MAX


def _merged(blocks: list[_Block], recheck: bool) -> tuple[_Block, list[list[int]]]:
    """One block of the blocks' missing rows (one unit, keys known), each distinct key once;
    and per block, the position in it of each of its missing rows."""
    first = blocks[0]
    at_key: dict[str, int] = {}
    rows: list[np.ndarray] = []
    ats: list[list[int]] = []
    for block in blocks:
        keys = block.keys
        assert keys is not None
        at: list[int] = []
        for i in block.missing:
            p = at_key.setdefault(keys[i], len(rows))
            if p == len(rows):
                rows.append(block.rows[i])
            at.append(p)
        ats.append(at)
    n = len(rows)
    merged = _Block(first.unit, np.stack(rows), list(at_key), [None] * n, ["miss"] * n,
                    list(range(n)), first.use_l2, recheck)
    return merged, ats


def _answer(blocks: list[_Block]) -> Answer:
    values: dict[Output, list[bytes]] = {}
    sources = blocks[0].sources
    for b in blocks:
        vals: list[bytes] = b.values  # type: ignore[assignment]  # every row is filled
        if b.unit == "label":
            values["label"] = vals
        elif b.unit == "proba":
            values["probabilities"] = vals
        else:
            pairs = [v.partition(SEP) for v in vals]
            values["label"] = [p[0] for p in pairs]
            values["probabilities"] = [p[2] for p in pairs]
        if b is not blocks[0]:
            sources = [a if _RANK[a] >= _RANK[s] else s
                       for a, s in zip(sources, b.sources, strict=True)]
    return Answer(values, sources)
