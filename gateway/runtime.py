"""The gateway's long-lived state: loaded models, cache tiers, predictor; opened and closed
by the app's lifespan, handed to each request as ``scope["state"]["gateway"]``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
from starlette.requests import Request

from gateway.breaker import CircuitBreaker
from gateway.cache import L1Cache, RedisCache
from gateway.errors import GatewayError, InvalidInput, NotFound, Unavailable
from gateway.metrics import Metrics
from gateway.predictor import ModelRuntime, Predictor, Source
from gateway.redis_client import connect_redis
from gateway.settings import Settings
from model_store import ModelStore, ModelStoreError

__all__ = ["Gateway", "gateway_of"]

log = logging.getLogger("gateway")

_MAX_TIMEOUT_MS = 600_000


@dataclass(eq=False)
class Gateway:
    """Everything a request needs. Build with ``await Gateway.open(...)``."""

    settings: Settings
    store: ModelStore
    metrics: Metrics
    predictor: Predictor
    l1: L1Cache | None
    l2: RedisCache | None
    models: dict[str, dict[int, ModelRuntime]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # "name:version" -> reason
    accepting: bool = True

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
            l2 = RedisCache(
                connect_redis(settings.redis_url, command_timeout_s=timeout_s,
                              connect_timeout_s=settings.redis_connect_timeout_ms / 1000,
                              max_connections=settings.redis_max_connections),
                timeout_s=timeout_s,
                ttl_s=settings.cache_ttl_s,
                breaker=breaker,
                metrics=metrics,
                write_backlog=settings.redis_write_backlog,
            )
            await l2.start()
        elif settings.redis_url:
            log.info("GATEWAY_CACHE=off: GATEWAY_REDIS_URL is ignored")
        predictor = Predictor(
            metrics, prefix=settings.cache_prefix, l1=l1, l2=l2,
            coalesce=settings.coalesce == "on",
            l2_min_call_s=settings.l2_min_call_us / 1e6,
        )
        gw = cls(settings, store, metrics, predictor, l1, l2)
        for name, versions in store.models().items():
            for version in versions:
                try:
                    model = await store.load(name, version)
                except ModelStoreError as exc:
                    gw.failed[f"{name}:{version}"] = str(exc)
                    log.error("model %s v%d not loaded: %s", name, version, exc)
                    continue
                rt = ModelRuntime(
                    model, metrics,
                    limiter=anyio.CapacityLimiter(settings.infer_concurrency),
                    prefer_compiled=settings.backend == "auto",
                    placement=settings.execution,
                    inline_max_s=settings.inline_max_us / 1e6,
                    batching=settings.batch == "on",
                    max_batch_size=settings.max_batch_size,
                    max_delay_s=settings.max_batch_delay_us / 1e6,
                    max_queue=settings.max_queue_rows,
                    concurrency=settings.infer_concurrency,
                )
                if rt.batcher is not None:
                    rt.batcher.start()
                gw.models.setdefault(name, {})[version] = rt
                m = model.manifest
                log.info("loaded model %s v%d (%s, %d features, sha256 %s, backends %s)",
                         name, version, m.task, len(m.features), m.sha256[:12],
                         ", ".join(f"{o}={b}" for o, b in rt.backends.items()))
        if not gw.models:
            log.warning("no model loaded from %s", store.root)
        log.info(
            "cache tiers: l1=%s l2=%s; coalesce=%s batch=%s",
            "on" if l1 is not None else "off",
            settings.redis_url if l2 is not None else "off",
            settings.coalesce, settings.batch,
        )
        return gw

    # -- per request ---------------------------------------------------------------------------
    def runtime(self, name: str, version: Any = None) -> ModelRuntime:
        """The runtime for ``name`` at ``version`` (int, numeric string, ``latest`` or None)."""
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"model {name!r} is not loaded", code="model_not_found")
        if version is None or version == "latest":
            return versions[max(versions)]
        if isinstance(version, bool) or not isinstance(version, int | str):
            raise InvalidInput(f"version: expected an integer, got {version!r}",
                               code="invalid_version")
        try:
            v = int(version)
        except ValueError:
            raise InvalidInput(f"version: expected an integer, got {version!r}",
                               code="invalid_version") from None
        rt = versions.get(v)
        if rt is None:
            raise NotFound(
                f"model {name!r} has no version {v} (loaded: {sorted(versions)})",
                code="version_not_found",
            )
        return rt

    def timeout_s(self, header: str | None) -> float:
        """The request's deadline in seconds: ``X-Request-Timeout-Ms`` or the default."""
        if header is None:
            return self.settings.request_timeout_ms / 1000
        if not header.isdigit() or not 0 < int(header) <= _MAX_TIMEOUT_MS:
            raise InvalidInput(
                f"X-Request-Timeout-Ms: expected an integer from 1 to {_MAX_TIMEOUT_MS}, "
                f"got {header!r}",
                code="invalid_timeout",
            )
        return int(header) / 1000

    async def predict(
        self, rt: ModelRuntime, rows: np.ndarray, proba: bool, timeout_s: float
    ) -> tuple[list[Any], list[Source]]:
        """``Predictor.predict`` for a request; see there for errors."""
        if not self.accepting:
            raise Unavailable("shutting down", code="shutting_down")
        if proba and not rt.model.has_proba:
            raise InvalidInput(
                f"model {rt.manifest.name} v{rt.manifest.version} has no probabilities",
                code="probabilities_unsupported",
            )
        return await self.predictor.predict(rt, rows, proba, timeout_s)

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

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name, versions in sorted(self.models.items()):
            latest = versions[max(versions)].manifest
            out.append({
                "name": name,
                "latest": str(latest.version),
                "versions": [
                    {"version": str(v), "sha256": rt.manifest.sha256,
                     "created": rt.manifest.created, "backends": rt.backends}
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
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        runtimes = [rt for vs in self.models.values() for rt in vs.values()]
        await asyncio.gather(*(
            rt.batcher.aclose(grace) for rt in runtimes if rt.batcher is not None
        ))

    async def aclose(self) -> None:
        """``drain``, then close the caches and forget the models."""
        await self.drain()
        await self.predictor.aclose()
        if self.l2 is not None:
            await self.l2.aclose()
        self.models.clear()


def gateway_of(request: Request) -> Gateway:
    """The ``Gateway`` the lifespan handed to this request."""
    gw: Gateway = request.scope["state"]["gateway"]
    return gw
