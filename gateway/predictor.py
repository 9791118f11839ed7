"""The prediction path: keys -> L1 -> L2 -> single-flight -> micro-batcher -> model.

``Predictor.predict`` answers a matrix of validated rows for one model version, computing only
the rows no tier holds, each at most once at a time (single-flight), in as few model calls as
the load allows (micro-batcher). Results go to L1 before the in-flight entry is freed, and to
Redis in the background. A model measured to answer in microseconds (a compiled one) skips
Redis, and its misses are answered by one inline call on the spot, which costs less than the
coordination it replaces.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import numpy as np
import orjson

from gateway.batcher import BatcherClosed, MicroBatcher, QueueFull
from gateway.cache import L1Cache, RedisCache
from gateway.errors import DeadlineExceeded, GatewayError, ModelFailed, Overloaded, Unavailable
from gateway.executor import Executor, Placement
from gateway.keys import canonical_rows, row_keys
from gateway.metrics import Metrics
from gateway.singleflight import SingleFlight
from model_store import LoadedModel

__all__ = ["ModelRuntime", "Predictor", "Source"]

log = logging.getLogger("gateway.predictor")

Source = Literal["l1", "l2", "miss"]


@dataclass(frozen=True, slots=True)
class _Row:
    x: np.ndarray  # one canonical row, shape (n_features,)
    proba: bool


class ModelRuntime:
    """One loaded model version: the estimator, its batcher (if batching) and its counters."""

    def __init__(
        self,
        model: LoadedModel,
        metrics: Metrics,
        *,
        limiter: anyio.CapacityLimiter,
        prefer_compiled: bool = True,
        placement: Placement = "auto",
        inline_max_s: float = 100e-6,
        batching: bool,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        concurrency: int,
    ) -> None:
        self.model = model
        self.manifest = model.manifest
        version = str(model.version)
        self._calls = metrics.model_calls.labels(model.name, version)
        self._rows = metrics.model_rows.labels(model.name, version)
        self.prefer_compiled = prefer_compiled
        self.backends = model.backends(prefer_compiled=prefer_compiled)
        inline_calls = metrics.model_exec.labels(model.name, version, "inline")
        thread_calls = metrics.model_exec.labels(model.name, version, "thread")
        call_seconds = metrics.model_call_seconds.labels(model.name, version)

        def on_call(inline: bool, _seconds: float) -> None:
            (inline_calls if inline else thread_calls).inc()
            call_seconds.set(self.executor.per_call_s)

        self.executor = Executor(limiter=limiter, placement=placement,
                                 inline_max_s=inline_max_s, on_call=on_call)
        self.batcher: MicroBatcher[_Row, Any] | None = None
        if batching:
            self.batcher = MicroBatcher(
                self.run,
                executor=self.executor,
                max_batch_size=max_batch_size,
                max_delay_s=max_delay_s,
                max_queue=max_queue,
                concurrency=concurrency,
                on_batch=metrics.batch_rows.observe,
            )
            batcher = self.batcher
            metrics.queue_rows.labels(f"{model.name}:{version}").set_function(
                lambda: batcher.queued_rows)

    def run(self, rows: Sequence[_Row]) -> list[Any]:
        """Answer ``rows`` with one ``predict`` and/or one ``predict_proba`` call."""
        out: list[Any] = [None] * len(rows)
        for proba in (False, True):
            idx = [i for i, r in enumerate(rows) if r.proba is proba]
            if not idx:
                continue
            x = np.stack([rows[i].x for i in idx])
            values = (self.model.predict_proba(x, prefer_compiled=self.prefer_compiled) if proba
                      else self.model.predict(x, prefer_compiled=self.prefer_compiled))
            self._calls.inc()
            self._rows.inc(len(idx))
            for i, v in zip(idx, values, strict=True):
                out[i] = v
        return out


class Predictor:
    """Shared by all models of one app; see the module docstring."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        prefix: str,
        l1: L1Cache | None,
        l2: RedisCache | None,
        coalesce: bool,
        l2_min_call_s: float = 0.0,
    ) -> None:
        self._metrics = metrics
        self._prefix = prefix
        self._l1 = l1
        self._l2 = l2
        self._l2_min_call = l2_min_call_s
        self._flights: SingleFlight[str, Any] | None = (
            SingleFlight(abandon=True) if coalesce else None
        )
        self._l1_hit = metrics.cache_lookups.labels("l1", "hit")
        self._l1_miss = metrics.cache_lookups.labels("l1", "miss")
        self._l2_hit = metrics.cache_lookups.labels("l2", "hit")
        self._l2_miss = metrics.cache_lookups.labels("l2", "miss")
        self._l2_error = metrics.cache_lookups.labels("l2", "error")

    def waiting(self) -> int:
        """Requests waiting on an in-flight computation now (0 without coalescing)."""
        return self._flights.waiting() if self._flights is not None else 0

    async def predict(
        self, rt: ModelRuntime, rows: np.ndarray, proba: bool, timeout_s: float
    ) -> tuple[list[Any], list[Source]]:
        """Values and cache sources for ``rows`` (float64, validated), in row order.

        L1 hits are answered without awaiting anything; what remains runs under the
        ``timeout_s`` deadline.

        Raises:
            DeadlineExceeded: no complete answer within ``timeout_s``.
            Overloaded: the model's queue is full.
            Unavailable: shutting down.
            ModelFailed: the model raised for one of the rows.
        Cancelling it (deadline, client gone) drops its rows that nobody else waits for.
        """
        rows = canonical_rows(rows)
        n = len(rows)
        values: list[Any] = [None] * n
        sources: list[Source] = ["miss"] * n
        keys: list[str] | None = None
        if self._l1 is not None or self._flights is not None:
            keys = row_keys(self._prefix, rt.manifest.name, rt.manifest.digest, rows, proba)
        missing: list[int] = list(range(n))
        if self._l1 is not None and keys is not None:
            missing = self._from_l1(keys, values, sources)
            if not missing:
                return values, sources
        use_l2 = self._l2 is not None and keys is not None and self._l2_pays(rt)
        if not use_l2 and self._answer_inline(rt, rows, proba, keys, missing, values):
            return values, sources  # nothing awaited: no deadline to watch
        try:
            async with asyncio.timeout(timeout_s):
                await self._fill(rt, rows, proba, keys, missing, values, sources, use_l2=use_l2)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within {timeout_s * 1000:.0f} ms") from None
        return values, sources

    async def _fill(
        self,
        rt: ModelRuntime,
        rows: np.ndarray,
        proba: bool,
        keys: list[str] | None,
        missing: list[int],
        values: list[Any],
        sources: list[Source],
        *,
        use_l2: bool,
    ) -> None:
        """L2, then the model, for ``missing``. Without L2 the inline attempt was already made
        (and declined) by ``predict``."""
        if use_l2:
            assert keys is not None
            missing = await self._from_l2(keys, missing, values, sources)
            if not missing or self._answer_inline(rt, rows, proba, keys, missing, values):
                return
        if len(missing) == 1:
            i = missing[0]
            values[i] = await self._compute(rt, rows[i], keys[i] if keys else None, proba)
        else:
            computed = await asyncio.gather(
                *(self._compute(rt, rows[i], keys[i] if keys else None, proba) for i in missing)
            )
            for i, v in zip(missing, computed, strict=True):
                values[i] = v

    def _answer_inline(
        self,
        rt: ModelRuntime,
        rows: np.ndarray,
        proba: bool,
        keys: list[str] | None,
        missing: list[int],
        values: list[Any],
    ) -> bool:
        """Answer ``missing`` rows with one inline model call when that call is measured to be
        tiny and none of them is being computed already. Nothing else runs meanwhile, so the
        values are in L1 before any other request looks: single-flight and batching would be
        pure overhead here. False: take the single-flight and batcher path."""
        if not rt.executor.inline_for(len(missing)):
            return False
        if keys is not None and self._flights is not None and any(
                keys[i] in self._flights for i in missing):
            return False  # join the computation already under way instead
        batch = [_Row(rows[i], proba) for i in missing]
        try:
            computed = rt.executor.run_inline(rt.run, batch)
        except Exception as exc:  # one bad row: let the batcher path isolate it
            log.debug("inline batch raised %r; retrying rows through the batcher", exc)
            return False
        self._metrics.batch_rows.observe(len(batch))
        for i, value in zip(missing, computed, strict=True):
            values[i] = value
            if self._l1 is not None and keys is not None:
                self._put(rt, keys[i], value)
        return True

    def _l2_pays(self, rt: ModelRuntime) -> bool:
        """Is a Redis round trip cheaper than a call of this model? (Yes until measured.)"""
        return not rt.executor.measured or rt.executor.per_call_s >= self._l2_min_call

    def _from_l1(self, keys: list[str], values: list[Any], sources: list[Source]) -> list[int]:
        assert self._l1 is not None
        missing = []
        for i, key in enumerate(keys):
            v = self._l1.get(key)
            if v is None:
                missing.append(i)
            else:
                values[i] = v
                sources[i] = "l1"
        if missing:
            self._l1_miss.inc(len(missing))
        if len(missing) < len(keys):
            self._l1_hit.inc(len(keys) - len(missing))
        return missing

    async def _from_l2(
        self, keys: list[str], missing: list[int], values: list[Any], sources: list[Source]
    ) -> list[int]:
        assert self._l2 is not None and self._l1 is not None
        raw = await self._l2.get_many([keys[i] for i in missing])
        if raw is None:
            self._l2_error.inc(len(missing))
            return missing
        still = []
        for i, blob in zip(missing, raw, strict=True):
            if blob is None:
                still.append(i)
                continue
            v = orjson.loads(blob)
            values[i] = v
            sources[i] = "l2"
            self._l1.put(keys[i], v)
        if still:
            self._l2_miss.inc(len(still))
        if len(still) < len(missing):
            self._l2_hit.inc(len(missing) - len(still))
        return still

    async def _compute(self, rt: ModelRuntime, x: np.ndarray, key: str | None, proba: bool) -> Any:
        if self._flights is None or key is None:
            return await self._infer_and_store(rt, x, key, proba)
        value, shared = await self._flights.do(
            key, lambda: self._infer_and_store(rt, x, key, proba)
        )
        if shared:
            self._metrics.coalesced.labels(rt.manifest.name).inc()
        return value

    async def _infer_and_store(
        self, rt: ModelRuntime, x: np.ndarray, key: str | None, proba: bool
    ) -> Any:
        if self._l1 is not None and key is not None:
            cached = self._l1.get(key)  # stored by a flight that ended after our lookup
            if cached is not None:
                return cached
        value = await self._infer(rt, _Row(x, proba))
        if self._l1 is not None and key is not None:
            self._put(rt, key, value)
        return value

    def _put(self, rt: ModelRuntime, key: str, value: Any) -> None:
        assert self._l1 is not None
        self._l1.put(key, value)
        if self._l2 is not None and self._l2_pays(rt):
            self._l2.put(key, orjson.dumps(value))

    async def _infer(self, rt: ModelRuntime, row: _Row) -> Any:
        try:
            if rt.batcher is not None:
                return await rt.batcher.submit(row)
            (value,) = await rt.executor.run(rt.run, [row])
            return value
        except QueueFull as exc:
            raise Overloaded(f"model {rt.manifest.name} v{rt.manifest.version}: {exc}") from exc
        except BatcherClosed as exc:
            raise Unavailable(f"shutting down: {exc}") from exc
        except GatewayError:
            raise
        except Exception as exc:  # the model's own error: named, logged, answered as 500
            log.warning("model %s v%s raised %r", rt.manifest.name, rt.manifest.version, exc)
            raise ModelFailed(
                f"model {rt.manifest.name} v{rt.manifest.version} failed on this input "
                f"({type(exc).__name__})"
            ) from exc

    async def aclose(self) -> None:
        if self._flights is not None:
            await self._flights.aclose()
