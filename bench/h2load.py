"""Closed-loop gRPC load with h2load (nghttp2): one fixed gRPC-framed body posted again and
again over HTTP/2 cleartext, and the CPU h2load itself used (its rusage, read when reaped).

h2load knows HTTP statuses only; a gRPC error is an HTTP 200 whose trailers say
``grpc-status``. So a run sends a fixed number of requests (``-n``), all of which end before it
does, and counts the DATA bytes that came back: a unary call that failed sends none, one that
succeeded sends exactly its answer's frame. ``H2loadResult.invalid`` says why a run cannot be
taken as a throughput (requests that did not finish, non-2xx statuses, DATA that is not
``requests`` answers of the expected size).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.lua import PERCENTILES
from bench.procs import measured_run

__all__ = ["H2loadResult", "latencies", "parse_output", "run_h2load"]

_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_TRAFFIC = re.compile(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data")


@dataclass(frozen=True, slots=True)
class H2loadResult:
    """What one h2load run reported. ``answer_bytes``: the DATA bytes a successful call gets
    (its answer's frame); 0 when not known, and then DATA is not checked."""

    sent: int  # requests asked for (-n)
    done: int
    succeeded: int
    status_2xx: int
    data_bytes: int
    duration_s: float
    latency_us: dict[float, int]  # percentile -> microseconds (100: the maximum)
    answer_bytes: int = 0
    connections: int = 0
    streams: int = 0
    cpu_s: float | None = None  # h2load's user + system CPU seconds

    @property
    def rps(self) -> float:
        return self.done / self.duration_s if self.duration_s else 0.0

    @property
    def errors(self) -> int:
        """Calls that did not end with an answer: unfinished, non-2xx, or (DATA short of
        ``done`` answers) failed with a gRPC status."""
        bad = self.sent - min(self.done, self.succeeded, self.status_2xx)
        if self.answer_bytes:
            short = self.done * self.answer_bytes - self.data_bytes
            bad = max(bad, -(-short // self.answer_bytes) if short > 0 else 0)
        return bad

    @property
    def invalid(self) -> str | None:
        """Why the run is not a throughput, or None."""
        if self.done != self.sent or self.succeeded != self.sent:
            return (f"{self.done} of {self.sent} requests done, {self.succeeded} "
                    "succeeded")
        if self.status_2xx != self.sent:
            return f"{self.sent - self.status_2xx} answers not HTTP 2xx"
        if self.answer_bytes and self.data_bytes != self.sent * self.answer_bytes:
            return (f"{self.data_bytes} DATA bytes, not {self.sent} answers of "
                    f"{self.answer_bytes} (calls failed with a gRPC status)")
        return None


def parse_output(stdout: str) -> H2loadResult:
    """The figures of h2load's summary. Raises ValueError when it has none."""
    found = [p.search(stdout) for p in (_FINISHED, _REQUESTS, _STATUS, _TRAFFIC)]
    if not all(found):
        raise ValueError(f"no h2load summary in:\n{stdout[-2000:]}")
    fin, req, st, tr = found
    assert fin and req and st and tr
    seconds = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    done = int(req.group(3))
    rps = float(fin.group(3))
    return H2loadResult(
        sent=int(req.group(1)), done=done, succeeded=int(req.group(4)),
        status_2xx=int(st.group(1)), data_bytes=int(tr.group(3)),
        duration_s=done / rps if rps else seconds, latency_us={})


def latencies(log: str) -> dict[float, int]:
    """Latency percentiles (``bench.lua.PERCENTILES``, microseconds) of the requests in an
    h2load ``--log-file`` (start, status, microseconds per line) that got an HTTP status."""
    us = [int(cols[2]) for line in log.splitlines()
          if len(cols := line.split("\t")) >= 3 and cols[1] != "-1"]
    if not us:
        return {}
    got = np.percentile(np.asarray(us, dtype=np.float64), list(PERCENTILES), method="higher")
    return {float(p): int(v) for p, v in zip(PERCENTILES, got, strict=True)}


def run_h2load(address: str, path: str, body: bytes, *, requests: int | None = None,
               duration_s: float | None = None, connections: int = 64, streams: int = 8,
               answer_bytes: int = 0, timeout_s: float = 10.0) -> H2loadResult:
    """POST ``body`` (a gRPC frame) to ``path`` at ``address`` (``host:port``, cleartext
    HTTP/2) over ``connections`` with ``streams`` concurrent streams each, from one h2load
    thread: ``requests`` of them (every one ends before the run does, so the result can be
    checked; see ``H2loadResult.invalid``), or for ``duration_s`` (a warm-up, not checkable).

    Raises RuntimeError when h2load is missing or fails.
    """
    exe = shutil.which("h2load")
    if exe is None:
        raise RuntimeError("h2load not found: install it (apt-get install nghttp2-client) or "
                           "run scripts/ensure-tools.sh h2load")
    if (requests is None) == (duration_s is None):
        raise ValueError("give requests or duration_s")
    how = [f"-n{requests}"] if requests is not None else [f"-D{max(1, round(duration_s or 0))}"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "body.bin"
        data.write_bytes(body)
        out_path, log_path = Path(tmp) / "out", Path(tmp) / "log"
        with out_path.open("wb") as out:
            code, usage = measured_run(
                [exe, *how, f"-c{connections}", f"-m{streams}", "-t1", "-d", str(data),
                 "-H", "content-type: application/grpc", "-H", "te: trailers",
                 f"-N{timeout_s:g}s", f"--log-file={log_path}", f"http://{address}{path}"],
                stdout=out, stderr=subprocess.STDOUT,
                kill_after_s=(duration_s or 0) + timeout_s + 60 + (requests or 0) / 100)
        stdout = out_path.read_text(errors="replace")
        log = log_path.read_text() if log_path.exists() else ""
    if code != 0:
        raise RuntimeError(f"h2load failed ({code}): {stdout.strip()[-2000:]}")
    result = parse_output(stdout)
    return replace(result, sent=requests if requests is not None else result.sent,
                   latency_us=latencies(log), answer_bytes=answer_bytes,
                   connections=connections, streams=streams,
                   cpu_s=usage.ru_utime + usage.ru_stime)
