"""The machine description and per-process CPU time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.machine import describe, process_cpu_s, summary

# A parent that starts a child which burns 0.2 s of CPU, says so, then waits; the parent
# relays the line and waits for its own stdin to close.
_CHILD = ("import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: "
          "pass\nprint('burnt', flush=True)\nsys.stdin.read()\n")
_PARENT = ("import subprocess, sys\n"
           f"p = subprocess.Popen([sys.executable, '-c', {_CHILD!r}], stdin=subprocess.PIPE, "
           "stdout=subprocess.PIPE, text=True)\n"
           "print(p.stdout.readline().strip(), flush=True)\nsys.stdin.read()\n"
           "p.stdin.close()\np.wait()\n")


def test_the_machine_is_described() -> None:
    m = describe()
    assert m["cores"] >= 1 and m["cpu_model"]
    assert f"{m['cores']} cores ({m['cpu_model']})" in summary(m)


@pytest.mark.e2e
def test_cpu_time_counts_a_process_and_its_children() -> None:
    with subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None and parent.stdin is not None
        assert parent.stdout.readline().strip() == "burnt"
        total = process_cpu_s(parent.pid)
        parent.stdin.close()
        parent.wait(10)
    assert total is not None and total >= 0.2
    assert process_cpu_s(parent.pid) is None  # gone
    assert (process_cpu_s(os.getpid()) or 0) > 0
