"""The fixed-rate generator: its schedule against the real ceiling process, its connection
discipline and its answer parser against servers built to test them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from bench.doors import Load, build
from bench.loadgen import Result, Settings, run
from bench.procs import GatewayProcess, uvicorn_app
from tests.bench.checker import SlowServer

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


@pytest.fixture(scope="module")
def ceiling() -> Iterator[GatewayProcess]:
    """The bare ceiling endpoint, a real uvicorn process."""
    with uvicorn_app("bench.ceiling:app") as svc:
        yield svc


def _loadgen(url: str, rate: float, duration: float, *extra: str) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--url", url, "--rate", f"{rate:g}",
         "--duration", f"{duration:g}", "--warmup", "0.2", "--keys", "hot", "--json", *extra],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return Result.from_json(json.loads(proc.stdout))


@pytest.mark.e2e
@pytest.mark.slow
def test_a_fixed_rate_run_sends_its_schedule_and_judges_its_own_lateness(
        ceiling: GatewayProcess) -> None:
    # Behaviour only: every request of the schedule is sent once and answered, and the run
    # measures its own lateness and judges itself by its bound. Whether the generator keeps a
    # 5,000/s schedule on time depends on the machine's other processes: every bench run
    # checks that itself (a late run is marked invalid in the report, bench.report).
    r = _loadgen(ceiling.url, 5000, 2.0)
    assert r.sent == r.answered == 10_000
    assert r.bad == 0 and r.timeouts == 0
    assert 0 <= r.lateness_us[50.0] <= r.lateness_us[99.0] <= r.lateness_us[100.0]
    assert r.valid == (r.lateness_us[99.0] <= r.lateness_bound_us)
    assert r.valid or "lateness" in r.verdict
    assert r.cpu_share > 0


def _run(url: str, rate: float, n: int, **kw: Any) -> Result:
    settings = Settings(url=url, rate=rate, duration_s=n / rate, **kw)
    load = Load("get", "unique", FEATURES, salt=1)
    return run(build(load, settings.measured_requests, url.removeprefix("http://")), settings)


def test_a_connection_carries_one_request_at_a_time_and_more_are_opened() -> None:
    # Answers take 50 ms; at 200/s about ten are outstanding at once, on two pre-opened
    # connections: the generator must open more, never pipeline.
    with SlowServer(delay_s=0.05) as server:
        r = _run(server.url, 200, 60, connections=2, max_connections=64)
    assert server.stats.shared == 0
    assert server.stats.requests == 60 == r.answered
    assert r.bad == 0
    assert server.stats.connections == r.connections_opened > 2
    assert r.max_outstanding >= 5
    assert r.latency_us[50.0] >= 50_000  # the answers' delay, measured from due times


def test_connections_are_bounded_and_waiting_counts_in_latency() -> None:
    with SlowServer(delay_s=0.05) as server:
        r = _run(server.url, 200, 40, connections=1, max_connections=2)
    assert server.stats.connections == 2 and server.stats.shared == 0
    assert r.answered == 40 and r.waited_for_connection > 0
    # Two connections answer 40/s; 40 requests due over 0.2 s take ~1 s: the last ones
    # waited most of it, and that wait is in their latency.
    assert r.latency_us[100.0] > 500_000


@pytest.mark.parametrize(("mode", "field"), [("500", "errors"), ("chunked", "failures")])
def test_answers_outside_2xx_and_unreadable_ones_are_counted(mode: str, field: str) -> None:
    with SlowServer(mode=mode) as server:
        r = _run(server.url, 200, 20, connections=2, max_connections=8)
    assert getattr(r, field) == 20
    assert r.bad == 20 and r.answered + r.failures == 20


def test_connection_close_answers_are_read_and_the_connection_replaced() -> None:
    with SlowServer(mode="close") as server:
        r = _run(server.url, 200, 20, connections=1, max_connections=4)
    assert r.answered == 20 and r.bad == 0
    assert server.stats.shared == 0 and server.stats.connections >= 20


def test_unanswered_requests_are_timeouts_with_their_wait_as_latency() -> None:
    with SlowServer(delay_s=30) as server:
        r = _run(server.url, 100, 10, connections=1, max_connections=4, drain_s=0.2)
    assert r.timeouts == 10 and r.answered == 0
    assert r.latency_us[50.0] >= 200_000  # at least the drain: a lower bound, never 0


def test_a_late_run_is_invalid_and_says_why() -> None:
    r = Result(rate=100, duration_s=1, sent=100, answered=100, errors=0, failures=0,
               timeouts=0, latency_us={50.0: 500, 99.0: 900, 100.0: 1000},
               lateness_us={50.0: 10, 99.0: 2500, 100.0: 4000}, cpu_s=0.1, wall_s=1.0,
               connections_opened=2, max_outstanding=1, waited_for_connection=0,
               max_lateness_ms=1.0, cpu_wait_s=0.2)
    assert not r.valid
    assert "2.50 ms > 1.00 ms" in r.verdict and "waited for a CPU 20%" in r.verdict
    # the bound is 1 ms or a tenth of the p99 latency, whichever is larger
    slow = Result(**{**r.__dict__, "latency_us": {50.0: 500, 99.0: 30_000, 100.0: 40_000}})
    assert slow.valid and slow.lateness_bound_us == 3000
    assert Result.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert r.cpu_share == pytest.approx(0.1)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Settings(url="http://127.0.0.1:1", rate=0, duration_s=1)
    with pytest.raises(ValueError):
        Settings(url="http://127.0.0.1:1", rate=10, duration_s=1, connections=9,
                 max_connections=8)
    s = Settings(url="http://127.0.0.1:1", rate=1000, duration_s=2, warmup_s=0.5)
    assert (s.warm_requests, s.measured_requests) == (500, 2000)
    with pytest.raises(ValueError):
        run([b""] * 10, s)
