"""What the runner needs around a gRPC run: a first call checked by a real client, the
gateway's own count of calls by status code, and the generator in a process of its own.

A gRPC error is an HTTP 200 with ``grpc-status`` in its trailers, so a run is judged on more
than its generator's word: ``probe`` makes one call with grpc's client and checks the answer
(its frame size is what h2load must get back per call); ``call_codes`` reads
``gateway_grpc_requests_total{method="ModelInfer"}`` by code from a gateway's ``/metrics``, and
``server_verdict`` compares two readings with the calls the generator saw answered.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.grpc_load import Result, Settings
from bench.grpc_messages import INFER, check_answer, frame

__all__ = ["Probe", "call_codes", "generate", "probe", "server_verdict"]


@dataclass(frozen=True, slots=True)
class Probe:
    """One call's outcome: the answer's gRPC frame size, or why there is none."""

    answer_bytes: int = 0
    error: str | None = None


def probe(address: str, body: bytes, rows: int, timeout_s: float = 10.0) -> Probe:
    """Send ``body`` (a serialized ``ModelInferRequest`` of ``rows`` rows) once to
    ``address`` and check the answer (``check_answer``)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        try:
            answer: bytes = call(body, timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return Probe(error=f"answered {getattr(code, 'name', code)}")
    why = check_answer(answer, rows)
    return Probe(error=why) if why else Probe(len(frame(answer)))


def call_codes(url: str) -> dict[str, float]:
    """``ModelInfer`` calls a gateway at ``url`` has answered so far, by gRPC status code."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.labels["code"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "gateway_grpc_requests_total"
            and s.labels.get("method") == "ModelInfer"}


def server_verdict(before: dict[str, float], after: dict[str, float], answered: int
                   ) -> str | None:
    """What is wrong between two ``call_codes`` readings around a run whose generator saw
    ``answered`` calls answered OK: any other code, or fewer OK than that; None if nothing."""
    delta = {c: after.get(c, 0.0) - before.get(c, 0.0) for c in after}
    failed = {c: n for c, n in delta.items() if c != "OK" and n > 0}
    if failed:
        return "the server counted " + ", ".join(f"{n:g} x {c}" for c, n in failed.items())
    if delta.get("OK", 0.0) < answered:
        return (f"the server counted {delta.get('OK', 0.0):g} calls answered OK, "
                f"the generator {answered}")
    return None


def generate(settings: Settings) -> Result:
    """Run ``bench.grpc_load`` with ``settings`` in its own process and return its result.

    Raises RuntimeError when it fails.
    """
    s = settings
    cmd = [sys.executable, "-m", "bench.grpc_load", "--address", s.address, "--keys", s.keys,
           "--model", s.model, "--features", str(s.n_features), "--rows", str(s.rows),
           "--salt", str(s.salt), "--input", s.input_name, "--datatype", s.datatype,
           "--duration", f"{s.duration_s:g}", "--warmup", f"{s.warmup_s:g}",
           "--connections", str(s.connections), "--streams", str(s.streams),
           "--timeout", f"{s.timeout_s:g}", "--max-lateness-ms", f"{s.max_lateness_ms:g}",
           "--max-lateness-share", f"{s.max_lateness_share:g}",
           "--sample-every", str(s.sample_every), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          timeout=s.warmup_s + s.duration_s + 2 * s.timeout_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.grpc_load failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return Result.from_json(json.loads(proc.stdout))
