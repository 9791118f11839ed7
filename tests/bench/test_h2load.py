"""h2load's summary, and runs against a real gateway's gRPC service: a run of good calls is a
throughput, a run of calls failing with a gRPC status (HTTP 200 all the same) is not."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.grpc_messages import INFER, Bodies, frame
from bench.grpc_runs import probe
from bench.h2load import H2loadResult, latencies, parse_output, run_h2load
from tests.bench.grpc_gateway import GrpcGateway, grpc_gateway

_SUMMARY = (
    "finished in 441.90ms, 4525.93 req/s, 821.75KB/s\n"
    "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored, "
    "0 timeout\n"
    "status codes: 2000 2xx, 0 3xx, 0 4xx, 0 5xx\n"
    "traffic: 363.13KB (371844) total, 6.15KB (6300) headers (space savings 96.11%), "
    "191.41KB (196000) data\n")


def test_the_summary_is_parsed_and_judged() -> None:
    r = parse_output(_SUMMARY)
    assert (r.sent, r.done, r.status_2xx, r.data_bytes) == (2000, 2000, 2000, 196000)
    assert r.rps == pytest.approx(4525.93)
    good = H2loadResult(2000, 2000, 2000, 2000, 196000, 1.0, {}, answer_bytes=98)
    assert good.invalid is None and good.errors == 0
    short = H2loadResult(2000, 2000, 2000, 2000, 196000 - 3 * 98, 1.0, {}, answer_bytes=98)
    assert "DATA" in (short.invalid or "") and short.errors == 3
    unfinished = H2loadResult(2000, 1990, 1990, 1990, 1990 * 98, 1.0, {}, answer_bytes=98)
    assert "1990 of 2000" in (unfinished.invalid or "") and unfinished.errors == 10
    with pytest.raises(ValueError):
        parse_output("h2load: connection refused")


def test_latencies_come_from_the_log_of_answered_requests() -> None:
    log = "".join(f"17000000{i}\t200\t{i * 100}\n" for i in range(1, 101)) + "1\t-1\t999999\n"
    got = latencies(log)
    assert (got[1.0], got[50.0], got[100.0]) == (200, 5100, 10000)  # "higher" percentiles
    assert latencies("") == {}


@pytest.fixture(scope="module")
def gateway(session_store: Path) -> Iterator[GrpcGateway]:
    with grpc_gateway(session_store) as gw:
        yield gw


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("h2load") is None,
                    reason="h2load missing (scripts/ensure-tools.sh h2load)")
def test_good_calls_are_a_throughput_failed_ones_are_not(gateway: GrpcGateway) -> None:
    body = Bodies("hot", "iris", 4)[0]
    first = probe(gateway.address, body, 1)
    assert first.error is None and first.answer_bytes > 5
    r = run_h2load(gateway.address, INFER, frame(body), requests=300, connections=4,
                   streams=4, answer_bytes=first.answer_bytes)
    assert r.invalid is None and r.errors == 0 and r.done == 300
    assert r.data_bytes == 300 * first.answer_bytes
    assert r.cpu_s is not None and r.cpu_s > 0 and r.latency_us[100.0] > 0
    unknown = Bodies("hot", "no-such-model", 4)[0]
    assert probe(gateway.address, unknown, 1).error == "answered NOT_FOUND"
    bad = run_h2load(gateway.address, INFER, frame(unknown), requests=50, connections=2,
                     streams=2, answer_bytes=first.answer_bytes)
    assert bad.status_2xx == 50  # HTTP says nothing went wrong
    assert bad.invalid is not None and bad.errors == 50
