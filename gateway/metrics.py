"""Prometheus metrics of one app instance, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Every metric the gateway exports. The prometheus-client objects are thread-safe;
    ``in_flight`` is a plain int changed on the event loop only."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests", "HTTP requests by route template and status.",
            ["route", "status"], registry=r,
        )
        self.request_seconds = Histogram(
            "gateway_request_seconds", "HTTP request latency.", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = 0  # requests being answered now; read at scrape time, no lock
        Gauge(
            "gateway_requests_in_flight", "HTTP requests being answered now.", registry=r,
        ).set_function(lambda: self.in_flight)
        self.cache_lookups = Counter(
            "gateway_cache_lookups",
            "Cache lookups by tier (l1, l2) and result (hit, miss, error).",
            ["tier", "result"], registry=r,
        )
        self.coalesced = Counter(
            "gateway_coalesced", "Rows answered by another request's in-flight computation.",
            ["model"], registry=r,
        )
        self.model_calls = Counter(
            "gateway_model_calls", "Model predict invocations.", ["model", "version"], registry=r,
        )
        self.model_rows = Counter(
            "gateway_model_rows", "Rows passed to the model.", ["model", "version"], registry=r,
        )
        self.model_exec = Counter(
            "gateway_model_exec", "Model calls by where they ran (inline, thread).",
            ["model", "version", "place"], registry=r,
        )
        self.model_call_seconds = Gauge(
            "gateway_model_call_seconds_avg", "Moving average of one model call's duration.",
            ["model", "version"], registry=r,
        )
        self.batch_rows = Histogram(
            "gateway_batch_rows", "Rows per dispatched batch.", buckets=_BATCH_BUCKETS, registry=r,
        )
        self.queue_rows = Gauge(
            "gateway_queue_rows", "Rows waiting for a model call.", ["model"], registry=r,
        )
        self.rejected = Counter(
            "gateway_rejected", "Requests refused, by reason (error code).", ["reason"],
            registry=r,
        )
        self.redis_errors = Counter(
            "gateway_redis_errors", "Redis calls that failed or timed out.", registry=r,
        )
        self.circuit_open = Gauge(
            "gateway_circuit_open", "1 while the Redis circuit breaker skips Redis.", registry=r,
        )
        self.model_loads = Counter(
            "gateway_model_loads", "Model versions loaded, by result (loaded, failed).",
            ["model", "result"], registry=r,
        )
        self.l2_writes_dropped = Counter(
            "gateway_l2_writes_dropped", "Cache writes not sent to Redis (backlog full, circuit "
            "open or write failed).", registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
