"""Scenarios and gateway configurations the bench compares."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONFIGS", "DEFAULT_CONFIGS", "SCENARIOS", "Scenario"]

def _config(cache: str, coalesce: str, batch: str, backend: str = "sklearn") -> dict[str, str]:
    return {"GATEWAY_CACHE": cache, "GATEWAY_COALESCE": coalesce, "GATEWAY_BATCH": batch,
            "GATEWAY_BACKEND": backend}


# Gateway settings per configuration. The mechanism comparisons run on the sklearn backend
# ("naive" is one worker-thread predict per row); "compiled" is "full" on the verified ONNX
# backend, with model calls placed inline or in the thread by measurement.
CONFIGS: dict[str, dict[str, str]] = {
    "naive": _config("off", "off", "off"),
    "cache": _config("on", "off", "off"),
    "cache+coalesce": _config("on", "on", "off"),
    "full": _config("on", "on", "on"),
    "nocache": _config("off", "on", "on"),
    "compiled": _config("on", "on", "on", backend="auto"),
    "compiled-naive": _config("off", "off", "off", backend="auto"),
}
DEFAULT_CONFIGS = ("naive", "cache", "cache+coalesce", "full", "compiled")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    engine: str  # "wrk" (closed loop) or "burst" (Python, identical requests at once)
    get_only: bool = True  # only GET /predict: can run against any --baseline-url
    connections: int | None = None  # None: the --connections flag
    needs_redis_control: bool = False  # kills the bench's own redis-server mid-run


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("hot", "one row, asked again and again", "wrk"),
    Scenario("unique", "every request a new row", "wrk"),
    Scenario("zipf", "10,000 rows, Zipf-skewed (s=1.1)", "wrk"),
    Scenario("multirow", "POST of 32 new rows per request", "wrk", get_only=False),
    Scenario("lowload", "one connection, every request a new row", "wrk", connections=1),
    Scenario("burst", "N identical new rows fired at once", "burst"),
    Scenario("redis-down", "zipf load; Redis killed halfway", "wrk", get_only=False,
             needs_redis_control=True),
)}
