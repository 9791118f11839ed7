"""wrk's output parsing, the CPU time wrk itself used, and pinning wrk to cores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from bench import lua
from bench.doors import Load
from bench.wrk import _pinning, parse_output, run_wrk, threads_for
from tests.bench.checker import Expect, checking_server

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def test_wrk_output_parsing() -> None:
    out = ("Running 1s test\nBENCH_JSON {\"requests\":100,\"duration_us\":2000000,"
           "\"errors\":{\"connect\":1,\"read\":0,\"write\":0,\"status\":2,\"timeout\":0},"
           "\"latency_us\":{\"50\":1200,\"99\":5000}}\n")
    r = parse_output(out)
    assert (r.requests, r.duration_s, r.errors, r.rps) == (100, 2.0, 3, 50.0)
    assert r.latency_us == {50.0: 1200, 99.0: 5000}
    assert r.cpu_cores is None
    with pytest.raises(ValueError):
        parse_output("nothing")
    assert (threads_for(1), threads_for(64)) == (1, 2)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk missing (make test installs it)")
def test_a_run_reports_wrks_settings_and_cpu() -> None:
    expect = Expect("get", FEATURES)
    with checking_server(expect) as url:
        r = run_wrk(url, lua.script(Load("get", "hot", FEATURES)), duration_s=1,
                    connections=4)
    assert r.requests > 0 and r.errors == 0 and not expect.bad
    assert (r.threads, r.connections) == (2, 4)
    assert r.cpu_s is not None and r.cpu_s > 0
    assert r.cpu_cores is not None and 0 < r.cpu_cores <= 2.5


def test_cores_are_checked_before_wrk_starts() -> None:
    assert _pinning(None) is None
    cores = os.cpu_count() or 1
    for bad in (set(), {cores}, {0, cores + 3}):
        with pytest.raises(ValueError, match="not among this machine's cores"):
            _pinning(bad)


@pytest.mark.e2e
def test_the_pinning_applies_to_the_child_only() -> None:
    before = os.sched_getaffinity(0)
    show = "import os; print(sorted(os.sched_getaffinity(0)))"
    out = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True,
                         check=True, timeout=60, preexec_fn=_pinning({0}))
    assert out.stdout.strip() == "[0]"
    assert os.sched_getaffinity(0) == before


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk missing (make test installs it)")
def test_a_pinned_run_with_one_thread() -> None:
    expect = Expect("get", FEATURES)
    with checking_server(expect) as url:
        r = run_wrk(url, lua.script(Load("get", "hot", FEATURES)), duration_s=1,
                    connections=4, threads=1, cpus={0})
    assert r.requests > 0 and r.errors == 0 and not expect.bad
    assert (r.threads, r.connections) == (1, 4)
    assert r.cpu_cores is not None and 0 < r.cpu_cores <= 1.2  # one core at most
