"""What ``gateway/metrics.py`` (and ``gateway/workers.py``) rely on inside prometheus-client:
how the multiprocess mode is chosen and recognised, and the histogram internals the per-loop
``Tally`` writes to directly. ``FENCE`` is the table (see ``fence.py``); the tests below it run
prometheus-client's code for the behaviours a digest alone does not show."""

from __future__ import annotations

import inspect

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values

from tests.contracts.fence import Fence, check, pin, report

PV = "prometheus_client.values"
PM = "prometheus_client.metrics"

FENCE = Fence("prometheus-client", "0.26.0", "tests/contracts/test_prometheus_client.py", (
    # Multiprocess mode: chosen from the environment at import; recognised by _multiprocess.
    pin(PV, "get_value_class", "7de1718faa6e", "metrics:Metrics.__init__", "metrics:MULTIPROC_ENV"),
    pin(PV, "MultiProcessValue", "8077cd2c482f", "metrics:Metrics.__init__"),
    pin(PV, "MutexValue._multiprocess", None, "metrics:Metrics.__init__"),
    pin(PV, "ValueClass", None, "metrics:Metrics.__init__"),
    # Histogram internals: Tally.observe picks the bucket, Tally.flush adds to it.
    pin(PM, "Histogram._prepare_buckets", "e857c68ce987", "metrics:Tally.observe"),  # bounds
    pin(PM, "Histogram._metric_init", "61aeac1b768d", "metrics:Tally.flush"),  # _buckets, _sum
    pin(PM, "Histogram.observe", "38beca3be1d1", "metrics:Tally.observe", "metrics:Tally.flush"),
    pin(PM, "Histogram._child_samples", "a20de7fdbe76", "metrics:Tally.flush"),  # cumulates
    pin(PM, "Gauge._MULTIPROC_MODES", None, "metrics:Metrics.__init__"),
    # Called with these parameters.
    pin("prometheus_client.multiprocess", "MultiProcessCollector", None,
        "metrics:Metrics.__init__", signature="registry, path"),
    pin("prometheus_client.multiprocess", "mark_process_dead", None,
        "workers:_gone", signature="pid, path"),
    pin("prometheus_client.exposition", "CONTENT_TYPE_PLAIN_0_0_4", None, "metrics:CONTENT_TYPE"),
))


def test_prometheus_client_pins_hold() -> None:
    problems = check(FENCE)
    assert not problems, report(problems)


def test_this_process_is_not_in_multiprocess_mode_and_metrics_can_tell() -> None:
    """``Metrics`` tells the mode by ``values.ValueClass._multiprocess`` (re-check
    ``Metrics.__init__`` in gateway/metrics.py)."""
    assert values.MutexValue._multiprocess is False
    assert values.ValueClass is values.MutexValue  # PROMETHEUS_MULTIPROC_DIR unset here
    assert "_multiprocess = True" in inspect.getsource(values.MultiProcessValue)


def _exposition(observe: str) -> bytes:
    from gateway.metrics import Tally

    registry = CollectorRegistry()
    hist = Histogram("h", "h", ["route"], buckets=(0.1, 1.0, 10.0), registry=registry)
    count = Counter("c", "c", registry=registry)
    child = hist.labels("r")
    tally = Tally()
    for value in (0.0, 0.05, 0.1, 0.5, 1.0, 2.0, 10.0, 11.0, 1e9):
        if observe == "tally":
            tally.observe(child, value)
        else:
            child.observe(value)
    if observe == "tally":
        tally.inc(count, 3)
    else:
        count.inc(3)
    tally.flush()
    return b"\n".join(line for line in generate_latest(registry).splitlines()
                      if not line.startswith(b"#") and b"_created" not in line)


def test_a_tallied_histogram_renders_as_one_observed_directly() -> None:
    """``Tally`` writes to a histogram child's ``_buckets`` (one per upper bound, counted
    per bucket and cumulated at collection) and ``_sum``: same exposition as ``observe``,
    values on a bound included (re-check ``Tally`` in gateway/metrics.py if this fails)."""
    direct = _exposition("direct")
    assert _exposition("tally") == direct
    assert b'h_bucket{le="1.0",route="r"} 5.0' in direct and b"c_total 3.0" in direct


def test_the_gauge_modes_metrics_declares_are_accepted() -> None:
    registry = CollectorRegistry()
    for mode in ("livesum", "livemax", "livemostrecent"):
        Gauge(f"g_{mode}", "g", registry=registry, multiprocess_mode=mode)  # type: ignore[arg-type]


def test_counters_are_exported_with_the_total_suffix_the_readme_names() -> None:
    registry = CollectorRegistry()
    Counter("gateway_fast_lane_requests", "x", ["how"], registry=registry).labels("answered").inc()
    assert b'gateway_fast_lane_requests_total{how="answered"} 1.0' in generate_latest(registry)
