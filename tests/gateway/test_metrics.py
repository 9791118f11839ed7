"""``Metrics`` in its two modes. Multiprocess mode is chosen when prometheus-client is imported,
so it is exercised in child interpreters started with ``PROMETHEUS_MULTIPROC_DIR``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gateway.metrics import MULTIPROC_ENV, Metrics
from tests.deploy.support import metric_sum


def test_one_process_reads_in_flight_and_functions_at_scrape_time() -> None:
    m = Metrics(environ={})
    assert not m.multiprocess
    m.requests.labels("/predict", "200").inc(3)
    m.in_flight += 2
    queued = [5]
    m.queue_rows.labels("iris:1").set_function(lambda: queued[0])
    text = m.render().decode()
    assert metric_sum(text, "gateway_requests_total", route="/predict") == 3
    assert metric_sum(text, "gateway_requests_in_flight") == 2
    assert metric_sum(text, "gateway_queue_rows", model="iris:1") == 5
    m.in_flight -= 2
    queued[0] = 0
    text = m.render().decode()
    assert metric_sum(text, "gateway_requests_in_flight") == 0
    assert metric_sum(text, "gateway_queue_rows") == 0


def test_multiprocess_dir_set_after_import_is_refused() -> None:
    with pytest.raises(RuntimeError, match=MULTIPROC_ENV):
        Metrics(environ={MULTIPROC_ENV: "/nonexistent"})


_WORKER = textwrap.dedent("""
    import sys
    from gateway.metrics import Metrics
    m = Metrics()
    assert m.multiprocess
    m.requests.labels("/predict", "200").inc(int(sys.argv[1]))
    m.in_flight += int(sys.argv[2])
    m.queue_rows.labels("iris:1").set_function(lambda: float(sys.argv[3]))
    m.circuit_open.set(int(sys.argv[4]))
    sys.stdout.write(m.render().decode())
""")


_BUSY_THEN_MAYBE_IDLE = textwrap.dedent("""
    import sys
    from gateway.metrics import Metrics
    m = Metrics()
    queued = [4.0]
    m.queue_rows.labels("iris:1").set_function(lambda: queued[0])
    m.in_flight += 1  # a change of the in-flight count samples the functions (4)
    if sys.argv[1] == "idle":
        queued[0] = 0.0
        m.in_flight -= 1  # back to zero after a non-zero sample: sampled again (0)
""")


def run(script: str, directory: Path, *args: object) -> str:
    """Run ``script`` as one worker writing to ``directory``; its standard output."""
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
        env={**os.environ, MULTIPROC_ENV: str(directory)}, timeout=60, check=True,
    ).stdout


def merged(directory: Path) -> str:
    """What a scrape of any worker would show, read from the files by this process."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry).decode()


def worker(directory: Path, *args: int) -> str:
    """One worker that counts ``args`` (requests, in flight, queued, circuit) and scrapes."""
    return run(_WORKER, directory, *args)


@pytest.mark.e2e
@pytest.mark.slow
def test_workers_scrape_the_sum_of_all_workers(tmp_path: Path) -> None:
    first = worker(tmp_path, 3, 2, 7, 0)
    assert metric_sum(first, "gateway_requests_total", route="/predict") == 3
    assert metric_sum(first, "gateway_requests_in_flight") == 2
    assert metric_sum(first, "gateway_queue_rows") == 7
    pids_before = {p.stem.split("_")[-1] for p in tmp_path.glob("counter_*.db")}
    both = worker(tmp_path, 4, 1, 1, 1)
    assert metric_sum(both, "gateway_requests_total", route="/predict") == 7  # 3 + 4
    assert metric_sum(both, "gateway_requests_in_flight") == 3  # livesum: 2 + 1
    assert metric_sum(both, "gateway_queue_rows") == 8  # livesum, sampled at scrape
    assert metric_sum(both, "gateway_circuit_open") == 1  # livemax

    (first_pid,) = pids_before
    mark_process_dead(int(first_pid), str(tmp_path))  # type: ignore[no-untyped-call]
    after = merged(tmp_path)
    assert metric_sum(after, "gateway_requests_total", route="/predict") == 7  # counters stay
    assert metric_sum(after, "gateway_requests_in_flight") == 1  # the first one left
    assert metric_sum(after, "gateway_queue_rows") == 1


@pytest.mark.e2e
@pytest.mark.parametrize(("state", "queued"), [("busy", 4), ("idle", 0)])
def test_a_workers_function_gauges_reach_the_others_without_a_scrape(
    tmp_path: Path, state: str, queued: float
) -> None:
    run(_BUSY_THEN_MAYBE_IDLE, tmp_path, state)
    assert metric_sum(merged(tmp_path), "gateway_queue_rows", model="iris:1") == queued


@pytest.mark.anyio
async def test_process_and_collector_metrics_are_exported(session_store: Path) -> None:
    import gc

    from tests.support import probed_app

    async with probed_app(session_store) as (client, _, _):
        gc.collect()
        text = (await client.get("/metrics")).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["gateway_process_cpu_seconds"] > 0
    assert values["gateway_process_resident_memory_bytes"] > 10 * 2**20
    assert values["gateway_process_open_fds"] >= 3
    assert values['gateway_gc_collections_total{generation="2"}'] >= 1
    assert values['gateway_gc_pause_seconds_total{generation="2"}'] > 0


def test_tallied_counts_and_observations_render_as_if_made_directly() -> None:
    """What the tally holds is exported exactly as direct prometheus-client calls would be,
    bucket bounds included (a value equal to a bound falls in that bucket)."""
    direct, tallied = Metrics(environ={}), Metrics(environ={})
    values = [0.0005, 0.0004, 0.001, 0.3, 11.0, 0.0]
    for v in values:
        direct.request_seconds.labels("/predict").observe(v)
        tallied.tally.observe(tallied.request_seconds.labels("/predict"), v)
    direct.requests.labels("/predict", "200").inc(5)
    tallied.tally.inc(tallied.requests.labels("/predict", "200"), 2)
    tallied.tally.inc(tallied.requests.labels("/predict", "200"), 3)

    def samples(m: Metrics) -> list[str]:
        return [line for line in m.render().decode().splitlines()
                if line.startswith(("gateway_request_seconds_", "gateway_requests_total"))
                and "_created" not in line]

    assert samples(tallied) == samples(direct)
    assert len(samples(direct)) > len(values)
    assert samples(tallied) == samples(direct)  # flushed once, not twice


_TALLY_WORKER = textwrap.dedent("""
    from gateway.metrics import Metrics
    m = Metrics()
    m.in_flight += 1
    m.tally.inc(m.requests.labels("/predict", "200"), 3)
    m.in_flight -= 1  # back to zero: the tally reaches the file without a scrape
""")


@pytest.mark.e2e
def test_a_workers_tally_reaches_the_others_without_a_scrape(tmp_path: Path) -> None:
    run(_TALLY_WORKER, tmp_path)
    assert metric_sum(merged(tmp_path), "gateway_requests_total", route="/predict") == 3
