"""Closed-loop load with wrk: run a generated Lua script, parse its ``BENCH_JSON`` line, and
measure the CPU wrk itself used (its rusage, read when it is reaped). ``cpus`` pins wrk to
those cores (its affinity is set before it starts), so that the load generator and the server
under test need not share a core."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

from bench.procs import measured_run

__all__ = ["WrkResult", "parse_output", "run_wrk"]


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    errors: int  # socket errors + non-2xx/3xx responses
    latency_us: dict[float, int]  # percentile -> microseconds (100: the measured maximum)
    threads: int = 0
    connections: int = 0
    cpu_s: float | None = None  # wrk's user + system CPU seconds

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def cpu_cores(self) -> float | None:
        """wrk's CPU seconds per second of run (1.0 = one core busy)."""
        if self.cpu_s is None or not self.duration_s:
            return None
        return self.cpu_s / self.duration_s


def parse_output(stdout: str) -> WrkResult:
    """The result in wrk's output. Raises ValueError when the script printed none."""
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON "):])
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                errors=sum(int(v) for v in data["errors"].values()),
                latency_us={float(k): int(v) for k, v in data["latency_us"].items()},
            )
    raise ValueError(f"no BENCH_JSON line in wrk output:\n{stdout[-2000:]}")


def run_wrk(
    url: str, script: str, *, duration_s: float, connections: int, timeout_s: float = 10.0,
    threads: int | None = None, cpus: Collection[int] | None = None,
) -> WrkResult:
    """Run wrk against ``url`` (loopback) for ``duration_s`` with ``connections`` and
    ``threads`` (default ``threads_for(connections)``), on the cores ``cpus`` if given (else
    wherever the scheduler puts it).

    Raises RuntimeError when wrk is missing or fails, ValueError for cores this machine
    lacks.
    """
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk not found: install it (apt-get install wrk) or run `make bench`")
    threads = threads or threads_for(connections)
    pin = _pinning(cpus)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenario.lua"
        path.write_text(script)
        out_path, err_path = Path(tmp) / "out", Path(tmp) / "err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            code, usage = measured_run(
                [exe, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
                 f"--timeout={timeout_s:g}s", "-s", str(path), url],
                stdout=out, stderr=err, kill_after_s=duration_s + timeout_s + 30,
                preexec_fn=pin)
        stdout, stderr = out_path.read_text(), err_path.read_text()
    if code != 0:
        raise RuntimeError(f"wrk failed ({code}): {stderr.strip()}")
    return replace(parse_output(stdout), threads=threads, connections=connections,
                   cpu_s=usage.ru_utime + usage.ru_stime)


def threads_for(connections: int) -> int:
    """wrk threads for ``connections``: two, or one for a single connection."""
    return max(1, min(2, connections))


def _pinning(cpus: Collection[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` setting the child's CPU affinity to ``cpus``, checked here first."""
    if cpus is None:
        return None
    wanted = set(cpus)
    cores = set(range(os.cpu_count() or 1))
    if not wanted or not wanted <= cores:
        raise ValueError(f"cpus {sorted(wanted)} not among this machine's cores {sorted(cores)}")

    def pin() -> None:
        os.sched_setaffinity(0, wanted)
    return pin
