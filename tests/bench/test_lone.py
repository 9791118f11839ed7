"""``bench.lone``: CPU per request of the event loop and the process, by closed loop."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.loadgen import Result
from bench.lone import FixedRun, Run
from bench.machine import thread_cpu_s


def test_cpu_per_request_counts_the_loops_thread_and_every_thread() -> None:
    before = {10: 1.0, 11: 0.5}
    after = {10: 3.0, 11: 1.0, 12: 0.5}  # thread 12 started during the run
    run = Run.of(4, 1_000, 2.0, 10, before, after)
    assert run.rps == 500
    assert run.loop_s == pytest.approx(2.0 / 1_000)
    assert run.process_s == pytest.approx(3.0 / 1_000)


def test_a_fixed_rate_run_reports_latency_and_the_share_of_a_core_each_used() -> None:
    lat = {50.0: 800, 99.0: 2_500, 100.0: 9_000}
    result = Result(rate=1_000, duration_s=4, sent=4_000, answered=4_000, errors=0, failures=0,
                    timeouts=1, latency_us=lat, lateness_us={50.0: 10, 99.0: 90, 100.0: 200},
                    cpu_s=0.4, wall_s=4.0, connections_opened=16, max_outstanding=3,
                    waited_for_connection=0, max_lateness_ms=1.0)
    run = FixedRun.of(result, 5.0, 10, {10: 1.0, 11: 0.5}, {10: 4.0, 11: 1.5, 12: 0.5},
                      calls=400, rows=1_000, consulted=False)
    assert (run.rate, run.p50_s, run.p99_s, run.max_s) == (1_000, 800e-6, 2.5e-3, 9e-3)
    assert run.valid and run.bad == 1
    assert run.loop_share == pytest.approx(3.0 / 5.0)
    assert run.process_share == pytest.approx(4.5 / 5.0)
    assert run.rows_per_call == 2.5 and run.consulted is False
    idle = FixedRun.of(result, 5.0, 10, {}, {})
    assert idle.rows_per_call is None and idle.consulted is None


def test_threads_are_read_by_their_ids() -> None:
    ready, done = threading.Event(), threading.Event()
    ids: list[int] = []

    def other() -> None:
        ids.append(threading.get_native_id())
        ready.set()
        done.wait()

    t = threading.Thread(target=other)
    t.start()
    try:
        ready.wait()
        cpu = thread_cpu_s(os.getpid())
    finally:
        done.set()
        t.join()
    assert threading.get_native_id() in cpu and ids[0] in cpu
    assert all(v >= 0 for v in cpu.values())


@pytest.mark.e2e
@pytest.mark.slow
def test_closed_loops_of_one_and_four_connections_are_measured(session_store: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.lone", "--model-root", str(session_store),
         "--connections", "1,4", "--duration", "1", "--repetitions", "1", "--at", "0.25",
         "--env", "GATEWAY_EXECUTION=inline"],
        capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(
        "iris · v2-json · unique rows, 1 a request · Redis · GATEWAY_EXECUTION=inline · 1 x 1 s")
    cell = r"([\d,]+) \[[\d,]+ to [\d,]+\]"
    for c in (1, 4):
        (line,) = [s for s in lines if s.split()[:1] == [str(c)]]
        found = re.fullmatch(rf"\s*{c}\s+{cell}\s+{cell}\s+{cell}", line)
        assert found, line
        rps, loop_us, process_us = (int(g.replace(",", "")) for g in found.groups())
        assert rps > 0 and 0 < loop_us <= process_us, line
    at = lines.index(next(s for s in lines if s.startswith("fixed rate")))
    capacity = int(re.search(r"capacity: ([\d,]+) req/s", lines[at])[1].replace(",", ""))
    (run,) = lines[at + 2:]
    found = re.fullmatch(r"\s*([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)%\s+(\d+)%\s+"
                         r"([\d.]+)\s+(consulted|skipped)\s+"
                         r"(on time|late: latencies are upper bounds)", run)
    assert found, run
    rate, p50, p99, top, loop, process, per_call = (float(g.replace(",", ""))
                                                    for g in found.groups()[:7])
    assert abs(rate - capacity / 4) <= 1, run
    assert 0 < p50 <= p99 <= top and 0 < loop <= process and per_call >= 1, run
