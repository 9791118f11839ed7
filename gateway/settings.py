"""Gateway settings: one typed object, read from ``GATEWAY_*`` environment variables."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from hashlib import blake2b
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Switch = Literal["on", "off"]


class Settings(BaseSettings):
    """Every field can be set as ``GATEWAY_<FIELD>`` (e.g. ``GATEWAY_REDIS_URL``)."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    model_root: Path = Path("models")
    """Model store root: ``<root>/<name>/<version>/{model.joblib,model.json}``."""

    model_poll_s: float = Field(2.0, ge=0)
    """How often the store is checked for added, removed or changed versions (reading
    manifests only), seconds; 0 disables polling (``SIGHUP`` still reloads)."""

    admin_token: SecretStr | None = None
    """Bearer token for the model repository API (load, unload, index). Unset: refused."""

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
    URL. A Redis Cluster: ``redis+cluster://host:port`` (or ``rediss+cluster://``) naming any
    of its nodes. Unset: the gateway runs on the in-process cache alone."""

    cache_secret: SecretStr | None = None
    """Every Redis value carries a BLAKE2b tag over its key and itself, and a value whose tag
    does not verify is a miss (a value stored under another row's key, a corrupted one). With a
    secret the tag is keyed: whoever can write to Redis cannot forge answers either. Every
    gateway sharing the Redis needs the same secret."""

    cache_ttl_s: int = Field(3600, ge=1)
    """Redis entry lifetime (``SET … EX``), seconds."""

    redis_timeout_ms: int = Field(50, ge=1)
    """Upper bound on any single Redis call; a slower call counts as a failure."""

    redis_max_connections: int = Field(32, ge=1)
    """Connection pool size."""

    redis_write_backlog: int = Field(10_000, ge=1)
    """Cache writes waiting to be sent to Redis; beyond it new writes are dropped."""

    l2_min_call_us: int | None = Field(None, ge=0)
    """Unset: misses of a model are looked up in Redis (and coalesced across replicas) while
    its call for the rows costs at least the measured Redis round trip, with cross-replica
    coalescing at least ``gateway.remote.BLOCK_LOOP_S`` (once skipped, consulted again at twice
    that: ``gateway.core.sharing``); set: this many microseconds instead. 0: always consult
    Redis."""

    breaker_failures: int = Field(3, ge=1)
    """Consecutive Redis failures that open the circuit (Redis skipped)."""

    breaker_cooldown_s: float = Field(2.0, gt=0)
    """How long the circuit stays open before one probe call is let through."""

    # -- execution ---------------------------------------------------------------------------
    coalesce: Switch = "on"
    """``off`` disables single-flight: identical concurrent misses each compute."""

    batch: Switch = "on"
    """``off`` disables micro-batching: one ``predict`` thread call per row."""

    backend: Literal["auto", "library", "estimator", "sklearn"] = "auto"
    """What serves a model: ``auto``, for each output, the compiled backend the store chose and
    verified for it (ONNX, Treelite), else the model's library; ``library`` always the model's
    own library (scikit-learn, XGBoost, LightGBM) through its verified fast path; ``estimator``
    the estimator's own methods and nothing else, as a plain service does (for comparisons).
    ``sklearn`` is the former name of ``library``. (The store's ``--backend`` says what is
    built and verified at registration; this says what of it serves.)"""

    execution: Literal["auto", "inline", "thread"] = "auto"
    """Where model calls run: ``auto`` inline on the event loop when measured to be tiny,
    otherwise a worker thread; or force one."""

    inline_max_us: int = Field(1000, ge=0, le=10_000)
    """With ``execution=auto``: the longest call run inline (predicted CPU time, microseconds)."""

    infer_concurrency: int = Field(1, ge=1, le=64)
    """Model calls running at once per model version: its worker threads, each taking the next
    queued call as it ends one."""

    max_batch_size: int = Field(256, ge=1, le=65536)
    """Most rows in one ``predict`` call. A batch this big forms only while rows queue up behind
    a busy model; each call costs a hand-over to the model's thread and back (the GIL), which
    bigger calls spread over more rows."""

    max_batch_delay_us: int = Field(0, ge=0, le=1_000_000)
    """How long a dispatch may wait for its batch to fill; 0 never waits."""

    max_queue_rows: int = Field(4096, ge=1)
    """Rows waiting to be batched for a model call; beyond it requests are refused with 503.
    (Under load a few whole batches more wait in the model's thread queue, their calls
    formed: ``gateway.core.runner``.)"""

    switch_interval_us: int = Field(100, ge=1, le=100_000)
    """How long the event loop may keep the GIL from a model thread whose call has ended, while
    further calls wait for that thread (``sys.setswitchinterval``), microseconds; otherwise
    Python's own interval (5,000) holds, which favours the loop (``runner.SwitchInterval``)."""

    request_timeout_ms: int = Field(5000, ge=1)
    """Default per-request deadline (``X-Request-Timeout-Ms`` overrides it); 504 past it."""

    shutdown_grace_s: float = Field(5.0, ge=0)
    """On shutdown, how long queued and running rows get to finish before they fail."""

    gc_freeze: bool = True
    """After startup, move everything loaded so far (models, libraries) out of the garbage
    collector's reach: a full collection then scans only what requests allocate (~0.1 ms)
    instead of every library object (~50 ms, a latency spike each time)."""

    # -- logs --------------------------------------------------------------------------------
    access_log: Switch = "off"
    """``on`` writes one access-log line per request (method, path, status, duration, cache
    source, model, version, request id). Off by default: a log record per request costs
    throughput."""

    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per log line, for log shippers."""

    # -- traces ------------------------------------------------------------------------------
    tracing: Switch = "off"
    """``on`` records OpenTelemetry traces of the inference requests (``gateway.tracing``;
    needs the ``tracing`` extra) and exports them over OTLP. Off: no span is ever created."""

    tracing_endpoint: str | None = None
    """Where spans are exported, as is: ``http://collector:4318/v1/traces`` (OTLP/HTTP) or
    ``http://collector:4317`` (OTLP/gRPC; ``https://`` for TLS). Unset:
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, else ``OTEL_EXPORTER_OTLP_ENDPOINT``, else the local
    collector's default port."""

    tracing_protocol: Literal["http/protobuf", "grpc"] | None = None
    """OTLP transport. Unset: ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``, else
    ``OTEL_EXPORTER_OTLP_PROTOCOL``, else ``http/protobuf``."""

    tracing_sample_ratio: float | None = Field(None, ge=0, le=1)
    """Share of the requests without a sampled or unsampled ``traceparent`` that start a
    trace (a request with one follows its caller's decision). Unset:
    ``OTEL_TRACES_SAMPLER_ARG``, else 1."""

    tracing_service_name: str | None = None
    """The ``service.name`` of the spans. Unset: ``OTEL_SERVICE_NAME``, else
    ``inference-gateway``."""

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

    grpc_port: int | None = Field(None, ge=0, le=65535)
    """Port of the Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``,
    with ``grpc.health.v1`` and reflection), served by the same process and event loop as
    REST and through the same pipeline. Unset (the default): no gRPC listener. 0: a port the
    kernel picks (logged; for tests). With ``--workers N`` the workers share the port."""

    grpc_host: str = "127.0.0.1"
    """Address the gRPC service listens on (``0.0.0.0`` or ``[::]`` for every interface, as
    in a container)."""

    redis_connect_timeout_ms: int = Field(1000, ge=1)
    """Bound on opening one Redis connection (TCP, TLS, ``AUTH``), apart from
    ``redis_timeout_ms``: a connection is opened in the background and kept for later calls
    even when the call that asked for it has already given up."""

    # -- scale-out ---------------------------------------------------------------------------
    coalesce_remote: Literal["auto", "off"] = "auto"
    """Cross-replica single-flight. ``auto``: with Redis, for the misses of every model that
    consults Redis (see ``l2_min_call_us``), a replica that misses takes a lease on the row in
    Redis (or waits for the replica holding it), so a burst spread over replicas runs the
    model once. ``off``: each replica computes its own misses (local single-flight only)."""

    remote_lease_min_ms: int = Field(250, ge=10)
    """Shortest row lease (the lease is ``max(this, 4 x the model's average call time, 4 x the
    average hold from lease to stored values)``, renewed while the call runs); a waiter whose
    holder vanished computes after at most the lease plus one renewal period."""

    def cache_key(self) -> bytes | None:
        """The BLAKE2b key derived from ``cache_secret`` (None without one)."""
        if self.cache_secret is None:
            return None
        return blake2b(self.cache_secret.get_secret_value().encode(), digest_size=32,
                       person=b"gw-cache").digest()

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(REDIS_SCHEMES):
            raise ValueError(f"expected a URL starting with {', '.join(REDIS_SCHEMES)}")
        return url

    def problems(self) -> list[str]:
        """What makes these settings unusable to serve with, one line each (empty: none):
        a model root that is not a directory, a default model the store does not have."""
        out = []
        root = self.model_root
        if not root.is_dir():
            out.append(f"GATEWAY_MODEL_ROOT={str(root)!r}: not a directory (train the demo "
                       "model with `python -m model_store train-demo`, or point it at a store)")
        else:
            names = sorted(p.name for p in root.iterdir() if p.is_dir())
            if names and self.default_model not in names:
                out.append(f"GATEWAY_DEFAULT_MODEL={self.default_model!r}: not in the store "
                           f"(it has {', '.join(names)})")
        return out


def unknown_names(environ: Mapping[str, str]) -> list[str]:
    """One line per ``GATEWAY_*`` variable of ``environ`` that names no setting (a typo would
    otherwise leave its setting at the default without a word), with the closest setting."""
    known = [name.upper() for name in Settings.model_fields]
    out = []
    for var in sorted(environ):
        if var.startswith("GATEWAY_") and var[8:] not in known:
            close = difflib.get_close_matches(var[8:], known, n=1, cutoff=0.75)
            hint = f" (did you mean GATEWAY_{close[0]}?)" if close else ""
            out.append(f"{var}: not a setting{hint}; the settings are listed in the README")
    return out


REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
_SECRET_FIELDS = frozenset({"cache_secret", "admin_token"})


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per invalid setting: the variable, its value (secrets hidden, credentials in
    URLs redacted) and what is expected."""
    from gateway.redact import redact_url

    out = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        value = err.get("input")
        if field in _SECRET_FIELDS:
            shown = "***"
        elif field == "redis_url" and isinstance(value, str):
            shown = repr(redact_url(value))
        else:
            shown = repr(value)[:80]
        message = str(err["msg"]).removeprefix("Value error, ")
        out.append(f"GATEWAY_{field.upper()}={shown}: {message}")
    return out
