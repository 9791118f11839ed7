"""The gateway's long-lived state: loaded models, cache tiers, pipeline; opened and closed
by the app's lifespan, handed to each request as ``scope["state"]["gateway"]``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from redis.crc import key_slot
from starlette.requests import Request

from gateway.announce import Announcer
from gateway.breaker import CircuitBreaker
from gateway.cache import L1Cache, RedisCache
from gateway.core.batcher import Failure
from gateway.core.pipeline import Answer, Pending, Pipeline
from gateway.core.runner import ModelRunner, Output
from gateway.core.sharing import Sharing
from gateway.errors import GatewayError, InvalidInput, NotFound, Unavailable
from gateway.metrics import Metrics
from gateway.redact import redact_url
from gateway.redis_client import (
    connect_redis,
    connect_redis_cluster,
    is_cluster_url,
    subscriber_for,
)
from gateway.registry import ModelRegistry
from gateway.remote import BLOCK_LOOP_S, Remote
from gateway.settings import Settings
from gateway.tracing import Traced, Tracing
from model_store import ModelStore

__all__ = ["Gateway", "gateway_of"]

log = logging.getLogger("gateway")

_MAX_TIMEOUT_MS = 600_000
_TIMEOUT_DIGITS = 6  # enough for _MAX_TIMEOUT_MS
_VERSION_DIGITS = 9


@dataclass(eq=False)
class Gateway:
    """Everything a request needs. Build with ``await Gateway.open(...)``."""

    settings: Settings
    store: ModelStore
    metrics: Metrics
    pipeline: Pipeline
    l1: L1Cache | None
    l2: RedisCache | None
    registry: ModelRegistry
    accepting: bool = True
    remote: Remote | None = None
    sharing: Sharing | None = None
    announcer: Announcer | None = None
    tracing: Tracing | None = None  # None: tracing off (GATEWAY_TRACING)

    @property
    def models(self) -> dict[str, dict[int, ModelRunner]]:
        """Versions served now, by model name (see ``ModelRegistry``)."""
        return self.registry.models

    @property
    def failed(self) -> dict[str, str]:
        """Versions that could not be served: ``"name:version"`` -> reason."""
        return self.registry.failed

    @classmethod
    async def open(cls, settings: Settings, store: ModelStore, metrics: Metrics) -> Gateway:
        """Load every version of every model and start caches and batchers.

        A version that fails verification is logged and left out; Redis being down is logged
        and the gateway serves from L1 + model.
        """
        caching = settings.cache == "on"
        l1 = L1Cache(settings.l1_max_entries, settings.l1_ttl_s) if caching else None
        l2: RedisCache | None = None
        if caching and settings.redis_url:
            timeout_s = settings.redis_timeout_ms / 1000
            breaker = CircuitBreaker(
                failures=settings.breaker_failures,
                cooldown_s=settings.breaker_cooldown_s,
                on_change=lambda s: metrics.circuit_open.set(0 if s == "closed" else 1),
            )
            connect = connect_redis_cluster if is_cluster_url(settings.redis_url) else connect_redis
            l2 = RedisCache(
                connect(settings.redis_url, command_timeout_s=timeout_s,
                        connect_timeout_s=settings.redis_connect_timeout_ms / 1000,
                        max_connections=settings.redis_max_connections),
                timeout_s=timeout_s,
                ttl_s=settings.cache_ttl_s,
                breaker=breaker,
                metrics=metrics,
                write_backlog=settings.redis_write_backlog,
                secret=settings.cache_key(),
            )
            await l2.start()
        elif settings.redis_url:
            log.info("GATEWAY_CACHE=off: GATEWAY_REDIS_URL is ignored")
        remote = None
        if l2 is not None and settings.redis_url and settings.coalesce_remote == "auto":
            remote = await _open_remote(settings, l2, metrics)
        sharing = None
        if l2 is not None:
            override = settings.l2_min_call_us
            sharing = Sharing(metrics, round_trip_s=lambda: l2.round_trip_s,
                              floor_s=0.0 if remote is None else BLOCK_LOOP_S,
                              override_s=None if override is None else override / 1e6)
        pipeline = Pipeline(
            metrics, prefix=settings.cache_prefix, l1=l1, l2=l2,
            coalesce=settings.coalesce == "on", sharing=sharing, remote=remote,
        )
        registry = ModelRegistry(settings, store, metrics, pipeline)
        announcer = None
        if l2 is not None and settings.redis_url:
            announcer = Announcer(l2, _subscriber(settings, l2), prefix=settings.cache_prefix)
            announcer.start(registry.apply)
        tracing = Tracing.open(settings) if settings.tracing == "on" else None
        if tracing is not None:
            log.info("tracing on: sample ratio %g, %s", tracing.ratio, tracing.target)
        gw = cls(settings, store, metrics, pipeline, l1, l2, registry, remote=remote,
                 sharing=sharing, announcer=announcer, tracing=tracing)
        await registry.reload()
        if settings.model_poll_s > 0:
            registry.watch(settings.model_poll_s)
        if not gw.models:
            log.warning("no model loaded from %s", store.root)
        log.info(
            "cache tiers: l1=%s l2=%s; coalesce=%s remote=%s batch=%s",
            "on" if l1 is not None else "off",
            redact_url(settings.redis_url) if l2 is not None else "off",
            settings.coalesce, "on" if remote is not None else "off", settings.batch,
        )
        return gw

    # -- per request ---------------------------------------------------------------------------
    def runtime(self, name: str, version: Any = None) -> ModelRunner:
        """The runner for ``name`` at ``version`` (int, ASCII-digit string, ``latest`` or
        None). Raises NotFound (404) or InvalidInput (422)."""
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"model {name!r} is not loaded", code="model_not_found")
        if version is None or version == "latest":
            return versions[max(versions)]
        if type(version) is int:
            v = version
        elif (type(version) is str and 0 < len(version) <= _VERSION_DIGITS
              and version.isascii() and version.isdigit()):
            v = int(version)
        else:
            raise InvalidInput(f"version: expected a positive integer, got {version!r:.40}",
                               code="invalid_version")
        rt = versions.get(v)
        if rt is None:
            raise NotFound(
                f"model {name!r} has no version {v} (loaded: {sorted(versions)})",
                code="version_not_found",
            )
        return rt

    def timeout_s(self, header: bytes | None) -> float:
        """The request's deadline in seconds: ``X-Request-Timeout-Ms`` (ASCII digits, 1 to
        600000) or the default. Raises InvalidInput (``invalid_timeout``)."""
        if header is None:
            return self.settings.request_timeout_ms / 1000
        if (0 < len(header) <= _TIMEOUT_DIGITS and header.isdigit()
                and 0 < int(header) <= _MAX_TIMEOUT_MS):
            return int(header) / 1000
        raise InvalidInput(
            f"X-Request-Timeout-Ms: expected an integer from 1 to {_MAX_TIMEOUT_MS}, "
            f"got {header.decode('latin-1')!r:.40}",
            code="invalid_timeout",
        )

    def begin(self, requests: list[tuple[ModelRunner, np.ndarray, frozenset[Output]]],
              traces: list[Traced | None] | None = None) -> list[Answer | Pending | GatewayError]:
        """``Pipeline.begin`` for requests that arrived together: per request, its answer if it
        needs no waiting, else what ``finish`` completes, or its error (returned, not raised):
        Unavailable (shutting down), InvalidInput (probabilities of a model without them, a
        value out of range). ``traces``: per request, its sampled trace (None: tracing off)."""
        refused: list[GatewayError | None] = []  # None: admitted
        admitted = []
        for rt, rows, outputs in requests:
            if not self.accepting:
                refused.append(Unavailable("shutting down", code="shutting_down"))
            elif "probabilities" in outputs and not rt.has_proba:
                refused.append(InvalidInput(
                    f"model {rt.manifest.name} v{rt.manifest.version} has no probabilities",
                    code="probabilities_unsupported"))
            else:
                refused.append(None)
                admitted.append((rt, rows, outputs))
        if len(admitted) == len(requests):
            return self.pipeline.begin(admitted, traces)
        if traces is not None:
            traces = [t for t, r in zip(traces, refused, strict=True) if r is None]
        begun = iter(self.pipeline.begin(admitted, traces))
        return [next(begun) if r is None else r for r in refused]

    async def finish(self, pending: Pending, timeout_s: float) -> Answer:
        """``Pipeline.finish``: the rest of an answer ``begin`` left pending; raises as it
        does."""
        return await self.pipeline.finish(pending, timeout_s)

    def together(self, pendings: list[Pending]) -> list[list[int]]:
        """``Pipeline.together``: how ``finish_many`` groups pendings begun together."""
        return self.pipeline.together(pendings)

    async def finish_many(self, pendings: list[Pending], timeout_s: float
                          ) -> list[Answer | GatewayError | Failure]:
        """``Pipeline.finish_many``: one group of ``together`` completed as one; per pending,
        its answer, its error, or the Failure of a row the model refused (returned, not
        raised)."""
        return await self.pipeline.finish_many(pendings, timeout_s)

    def count_rejection(self, exc: GatewayError) -> None:
        self.metrics.rejected.labels(exc.code).inc()

    # -- status ------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Accepting requests, with at least one model loaded."""
        return self.accepting and bool(self.models)

    def cache_status(self) -> dict[str, str]:
        return {
            "l1": "ok" if self.l1 is not None else "off",
            "l2": self.l2.status if self.l2 is not None else "off",
        }

    def redis_use(self, rt: ModelRunner) -> dict[str, Any]:
        """Whether misses of ``rt`` are looked up in Redis and coalesced across replicas now,
        and why (``Sharing.explain``, plus ``cross_replica`` and the Redis status)."""
        if self.l2 is None or self.sharing is None:
            why = ("GATEWAY_CACHE=off" if self.settings.cache == "off"
                   else "no Redis configured (GATEWAY_REDIS_URL)")
            return {"consulted": False, "reason": why, "cross_replica": False}
        out = self.sharing.explain(rt)
        out["cross_replica"] = out["consulted"] and self.remote is not None
        if self.l2.blocked():
            out["reason"] += "; Redis not answering now (circuit open): L1 and the model meanwhile"
        return out

    async def change_repository(self, op: str, model: str) -> dict[str, Any]:
        """Load or unload ``model`` here (``ModelRegistry.apply``), then announce it to the
        other processes sharing the Redis. What it reached: ``{"processes": "all", "others":
        n}`` (the others subscribed now, which apply it too) or ``{"processes": "this"}``
        (no Redis, or it did not answer). Raises as ``ModelRegistry.apply``."""
        await self.registry.apply(op, model)
        heard = None if self.announcer is None else await self.announcer.announce(op, model)
        return {"processes": "this"} if heard is None else {"processes": "all", "others": heard}

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name, versions in sorted(self.models.items()):
            latest = versions[max(versions)].manifest
            out.append({
                "name": name,
                "latest": str(latest.version),
                "versions": [
                    {"version": str(v), "sha256": rt.manifest.sha256,
                     "created": rt.manifest.created, "backends": rt.backends,
                     "settings": rt.settings, "redis": self.redis_use(rt)}
                    for v, rt in sorted(versions.items())
                ],
                "task": latest.task,
                "features": list(latest.features),
                "classes": list(latest.classes),
            })
        return out

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop intake (new requests get 503 ``shutting_down``), let queued and running rows
        finish within ``grace_s`` (default ``GATEWAY_SHUTDOWN_GRACE_S``), then fail what is
        left with 503. Idempotent; never raises."""
        self.accepting = False
        await self.registry.drain(self.settings.shutdown_grace_s if grace_s is None else grace_s)

    async def aclose(self) -> None:
        """``drain``, then close the caches and forget the models."""
        await self.drain()
        await self.registry.aclose()
        await self.pipeline.aclose()
        if self.announcer is not None:
            await self.announcer.aclose()
        if self.remote is not None:
            await self.remote.aclose()
        if self.l2 is not None:
            await self.l2.aclose()
        if self.tracing is not None:
            await anyio.to_thread.run_sync(self.tracing.shutdown)


def _subscriber(settings: Settings, l2: RedisCache) -> Callable[[], Any]:
    """What makes a client for one pub/sub subscription on ``l2``'s Redis."""
    url = settings.redis_url
    assert url is not None
    connect_s = settings.redis_connect_timeout_ms / 1000
    return lambda: subscriber_for(url, l2.client, connect_timeout_s=connect_s)


async def _open_remote(settings: Settings, l2: RedisCache, metrics: Metrics) -> Remote:
    """Cross-replica single-flight over ``l2``'s Redis, its channel subscribed (or being)."""
    assert settings.redis_url is not None
    cluster = is_cluster_url(settings.redis_url)
    remote = Remote(l2, _subscriber(settings, l2), metrics, prefix=settings.cache_prefix,
                    lease_min_s=settings.remote_lease_min_ms / 1000,
                    slot_of=(lambda k: key_slot(k.encode())) if cluster else None)
    await remote.start(settings.redis_connect_timeout_ms / 1000)
    return remote


def gateway_of(request: Request) -> Gateway:
    """The ``Gateway`` the lifespan handed to this request."""
    gw: Gateway = request.scope["state"]["gateway"]
    return gw
