"""Closed-loop load with wrk: run a generated Lua script, parse its ``BENCH_JSON`` line."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WrkResult", "parse_output", "run_wrk"]


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    errors: int  # socket errors + non-2xx/3xx responses
    latency_us: dict[float, int]  # percentile -> microseconds

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


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
    url: str, script: str, *, duration_s: float, connections: int, timeout_s: float = 10.0
) -> WrkResult:
    """Run wrk against ``url`` (loopback) for ``duration_s`` with ``connections``.

    Raises RuntimeError when wrk is missing or fails.
    """
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk not found: install it (apt-get install wrk) or run `make bench`")
    threads = max(1, min(2, connections))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenario.lua"
        path.write_text(script)
        proc = subprocess.run(
            [exe, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
             f"--timeout={timeout_s:g}s", "-s", str(path), url],
            capture_output=True, text=True, timeout=duration_s + timeout_s + 30, check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_output(proc.stdout)
