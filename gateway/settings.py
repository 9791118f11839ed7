"""Gateway settings: one typed object, read from ``GATEWAY_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Switch = Literal["on", "off"]


class Settings(BaseSettings):
    """Every field can be set as ``GATEWAY_<FIELD>`` (e.g. ``GATEWAY_REDIS_URL``)."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    model_root: Path = Path("models")
    """Model store root: ``<root>/<name>/<version>/{model.joblib,model.json}``."""

    default_model: str = "iris"
    """Model answered by ``GET /predict``; its feature names are the query parameters."""

    # -- cache -------------------------------------------------------------------------------
    cache: Switch = "on"
    """``off`` disables both cache tiers (for side-by-side benchmarks)."""

    cache_prefix: str = "gw"
    """First segment of every cache key, so several deployments can share one Redis."""

    l1_max_entries: int = Field(100_000, ge=1)
    """In-process cache capacity (entries, least recently used evicted first)."""

    l1_ttl_s: float = Field(60.0, gt=0)
    """In-process cache entry lifetime, seconds."""

    redis_url: str | None = None
    """Shared L2 cache: ``redis://``, ``rediss://`` (TLS) or ``unix://``; credentials in the
    URL. Unset: the gateway runs on the in-process cache alone."""

    cache_ttl_s: int = Field(3600, ge=1)
    """Redis entry lifetime (``SET … EX``), seconds."""

    redis_timeout_ms: int = Field(50, ge=1)
    """Upper bound on any single Redis call; a slower call counts as a failure."""

    redis_max_connections: int = Field(32, ge=1)
    """Connection pool size."""

    redis_write_backlog: int = Field(10_000, ge=1)
    """Cache writes waiting to be sent to Redis; beyond it new writes are dropped."""

    l2_min_call_us: int = Field(250, ge=0)
    """Redis is consulted for a model only while its calls take at least this long on average
    (microseconds): answering a cheaper model again costs less than asking Redis. 0: always."""

    breaker_failures: int = Field(3, ge=1)
    """Consecutive Redis failures that open the circuit (Redis skipped)."""

    breaker_cooldown_s: float = Field(2.0, gt=0)
    """How long the circuit stays open before one probe call is let through."""

    # -- execution ---------------------------------------------------------------------------
    coalesce: Switch = "on"
    """``off`` disables single-flight: identical concurrent misses each compute."""

    batch: Switch = "on"
    """``off`` disables micro-batching: one ``predict`` thread call per row."""

    backend: Literal["auto", "sklearn"] = "auto"
    """``auto`` serves each output from the compiled (ONNX) model where the store verified it;
    ``sklearn`` always calls the estimator."""

    execution: Literal["auto", "inline", "thread"] = "auto"
    """Where model calls run: ``auto`` inline on the event loop when measured to be tiny,
    otherwise a worker thread; or force one."""

    inline_max_us: int = Field(100, ge=0, le=10_000)
    """With ``execution=auto``: the longest call (predicted, microseconds) run inline."""

    infer_concurrency: int = Field(1, ge=1, le=64)
    """Model calls running at once per model version (worker-thread slots)."""

    max_batch_size: int = Field(64, ge=1, le=65536)
    """Most rows in one ``predict`` call."""

    max_batch_delay_us: int = Field(0, ge=0, le=1_000_000)
    """How long a dispatch may wait for its batch to fill; 0 never waits."""

    max_queue_rows: int = Field(4096, ge=1)
    """Rows waiting for a model call; beyond it requests are refused with 503."""

    request_timeout_ms: int = Field(5000, ge=1)
    """Default per-request deadline (``X-Request-Timeout-Ms`` overrides it); 504 past it."""

    shutdown_grace_s: float = Field(5.0, ge=0)
    """On shutdown, how long queued and running rows get to finish before they fail."""

    gc_freeze: bool = True
    """After startup, move everything loaded so far (models, libraries) out of the garbage
    collector's reach: a full collection then scans only what requests allocate (~0.1 ms)
    instead of every library object (~50 ms, a latency spike each time)."""

    # -- input limits ------------------------------------------------------------------------
    max_rows: int = Field(1024, ge=1)
    """Most rows in one request."""

    max_body_bytes: int = Field(1 << 20, ge=1)
    """Largest request body accepted; larger ones get 413 before they are read whole."""

    # -- connections -------------------------------------------------------------------------
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    """Time a client has to send a request's headers, counted from its connection (or, on a
    kept-alive connection, from the request's first byte). Past it the gateway answers 408 and
    closes the connection."""

    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    """Time a client has to send a request's body once its headers are in; past it, 408 and the
    connection is closed (a body shorter than its ``Content-Length`` never waits longer)."""

    limit_concurrency: int | None = Field(None, ge=1)
    """Open connections at most per server process. A new connection past it closes the one
    that has waited longest for request headers (a slow or idle client); when every connection
    is busy with a request, new requests get 503. Unset: the open-file limit less a reserve for
    Redis, models and logs, so the process never runs out of descriptors (which would drop
    every waiting connection, good or bad)."""

    redis_connect_timeout_ms: int = Field(1000, ge=1)
    """Bound on opening one Redis connection (TCP, TLS, ``AUTH``), apart from
    ``redis_timeout_ms``: a connection is opened in the background and kept for later calls
    even when the call that asked for it has already given up."""
