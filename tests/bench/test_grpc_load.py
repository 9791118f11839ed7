"""The gRPC generator against a real gateway: new rows per call, every status counted, the
gateway's own count agreeing, and a failing load reported as invalid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.grpc_load import Result, Settings
from bench.grpc_runs import call_codes, generate, server_verdict
from bench.scrape import scrape
from tests.bench.grpc_gateway import GrpcGateway, grpc_gateway

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(session_store: Path) -> Iterator[GrpcGateway]:
    with grpc_gateway(session_store) as gw:
        yield gw


def _settings(gw: GrpcGateway, **kw: object) -> Settings:
    # Lateness is not what these tests judge: a shared machine may delay a short run's loop.
    return Settings(**{"address": gw.address, "duration_s": 0.5, "connections": 2,
                       "streams": 2, "sample_every": 10, "max_lateness_ms": 1000.0,
                       **kw})  # type: ignore[arg-type]


def test_new_rows_are_sent_checked_and_counted_alike(gateway: GrpcGateway) -> None:
    codes0, counters0 = call_codes(gateway.svc.url), scrape(gateway.svc.url)
    r = generate(_settings(gateway, rows=32, salt=11, warmup_s=0.2))
    assert r.invalid is None, r.invalid
    assert r.requests > 0 and r.errors == 0 and r.rows == 32
    assert r.checked == -(-(r.sent - sum(r.codes.values())) // 10)  # the first, one in ten
    assert r.cpu_s > 0 and r.lateness_us[100.0] >= r.lateness_us[50.0] >= 0
    answered = r.sent - sum(r.codes.values())
    assert server_verdict(codes0, call_codes(gateway.svc.url), answered) is None
    counted = scrape(gateway.svc.url) - counters0
    assert counted.hits == 0 and counted.lookups == answered * 32  # every row new
    assert Result.from_json(r.to_json()) == r


def test_calls_that_fail_make_the_run_invalid(gateway: GrpcGateway) -> None:
    codes0 = call_codes(gateway.svc.url)
    r = generate(_settings(gateway, model="no-such-model"))
    assert r.requests == 0 and r.codes.get("NOT_FOUND", 0) == r.sent > 0
    assert "NOT_FOUND" in (r.invalid or "")
    verdict = server_verdict(codes0, call_codes(gateway.svc.url), 0)
    assert verdict is not None and "NOT_FOUND" in verdict


def test_the_servers_count_judges_a_run() -> None:
    assert server_verdict({"OK": 5}, {"OK": 15}, 10) is None
    assert "UNAVAILABLE" in (server_verdict({"OK": 5}, {"OK": 15, "UNAVAILABLE": 1}, 10) or "")
    assert "counted 9" in (server_verdict({}, {"OK": 9}, 10) or "")
