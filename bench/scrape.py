"""Read the gateway's counters from its Prometheus text at ``/metrics``."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Counters", "parse_counters", "scrape"]


@dataclass(frozen=True, slots=True)
class Counters:
    """Totals over all labels; subtract two snapshots to get a run's share."""

    model_calls: float = 0.0
    model_rows: float = 0.0
    coalesced: float = 0.0
    hits: float = 0.0  # l1 + l2 hits
    lookups: float = 0.0  # l1 lookups (every row looked up once)
    redis_errors: float = 0.0
    in_flight: float = 0.0  # a gauge: requests being answered when scraped (this one too)

    def __sub__(self, other: Counters) -> Counters:
        """Counter differences; ``in_flight`` is the newer snapshot's."""
        return Counters(
            model_calls=self.model_calls - other.model_calls,
            model_rows=self.model_rows - other.model_rows,
            coalesced=self.coalesced - other.coalesced,
            hits=self.hits - other.hits,
            lookups=self.lookups - other.lookups,
            redis_errors=self.redis_errors - other.redis_errors,
            in_flight=self.in_flight,
        )


def parse_counters(text: str) -> Counters:
    """Sum the counters ``bench`` reports from one ``/metrics`` exposition."""
    sums = {"model_calls": 0.0, "model_rows": 0.0, "coalesced": 0.0, "hits": 0.0,
            "lookups": 0.0, "redis_errors": 0.0, "in_flight": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "gateway_requests_in_flight":
                sums["in_flight"] = value
            if name == "gateway_model_calls_total":
                sums["model_calls"] += value
            elif name == "gateway_model_rows_total":
                sums["model_rows"] += value
            elif name == "gateway_coalesced_total":
                sums["coalesced"] += value
            elif name == "gateway_redis_errors_total":
                sums["redis_errors"] += value
            elif name == "gateway_cache_lookups_total":
                if labels.get("result") == "hit":
                    sums["hits"] += value
                if labels.get("tier") == "l1":
                    sums["lookups"] += value
    return Counters(**sums)


def scrape(base_url: str, *, settle_s: float = 10.0) -> Counters | None:
    """Counters of the gateway at ``base_url`` once no other request is in flight (requests a
    load generator left behind still count towards the run that sent them), or None when it
    has no ``/metrics``."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            r = httpx.get(f"{base_url}/metrics", timeout=5)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        counters = parse_counters(r.text)
        if counters.in_flight <= 1 or time.monotonic() > deadline:
            return counters
        time.sleep(0.01)  # stragglers of the last run are still being answered
