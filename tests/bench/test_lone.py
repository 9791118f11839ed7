"""``bench.lone``: CPU per request of the event loop and the process, by closed loop."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.lone import Run
from bench.machine import thread_cpu_s


def test_cpu_per_request_counts_the_loops_thread_and_every_thread() -> None:
    before = {10: 1.0, 11: 0.5}
    after = {10: 3.0, 11: 1.0, 12: 0.5}  # thread 12 started during the run
    run = Run.of(4, 1_000, 2.0, 10, before, after)
    assert run.rps == 500
    assert run.loop_s == pytest.approx(2.0 / 1_000)
    assert run.process_s == pytest.approx(3.0 / 1_000)


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
         "--connections", "1,4", "--duration", "1", "--repetitions", "1",
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
