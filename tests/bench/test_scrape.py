"""Counters read from the gateway's Prometheus text."""

from __future__ import annotations

from bench.scrape import Counters, parse_counters

METRICS = """\
# TYPE gateway_model_calls_total counter
gateway_model_calls_total{model="iris",version="1"} 3.0
gateway_model_calls_total{model="iris",version="2"} 2.0
# TYPE gateway_model_rows_total counter
gateway_model_rows_total{model="iris",version="1"} 64.0
# TYPE gateway_cache_lookups_total counter
gateway_cache_lookups_total{result="hit",tier="l1"} 90.0
gateway_cache_lookups_total{result="miss",tier="l1"} 10.0
gateway_cache_lookups_total{result="hit",tier="l2"} 4.0
gateway_cache_lookups_total{result="miss",tier="l2"} 6.0
# TYPE gateway_coalesced_total counter
gateway_coalesced_total{model="iris"} 7.0
# TYPE gateway_redis_errors_total counter
gateway_redis_errors_total 1.0
"""


def test_metric_scraping_and_deltas() -> None:
    c = parse_counters(METRICS)
    assert c == Counters(model_calls=5, model_rows=64, coalesced=7, hits=94, lookups=100,
                         redis_errors=1)
    assert (c - Counters(model_calls=1, lookups=50)).lookups == 50
