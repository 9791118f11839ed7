"""Scenarios and gateway configurations the bench compares."""

from __future__ import annotations

from dataclasses import dataclass

from bench.doors import Door, Keys

__all__ = ["CEILING", "CONFIGS", "DEFAULT_CONFIGS", "DEFAULT_SCENARIOS", "GROUPS", "SCENARIOS",
           "Scenario"]

CEILING = "ceiling"


def _config(cache: str, coalesce: str, batch: str, backend: str = "library",
            execution: str = "auto") -> dict[str, str]:
    return {"GATEWAY_CACHE": cache, "GATEWAY_COALESCE": coalesce, "GATEWAY_BATCH": batch,
            "GATEWAY_BACKEND": backend, "GATEWAY_EXECUTION": execution}


# Gateway settings per configuration. The mechanism comparisons run on the library backend;
# "naive" is the common tutorial's service: the estimator's own predict, one worker-thread call
# per row. "compiled" is "full" on the verified ONNX backend. Model calls are placed inline or
# in the thread by measurement, except in "naive".
CONFIGS: dict[str, dict[str, str]] = {
    "naive": _config("off", "off", "off", backend="estimator", execution="thread"),
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
    """One load: which door, which rows, how many per request, and how it is driven."""

    name: str
    description: str
    engine: str  # "wrk" (closed loop; open loop by bench.loadgen), "burst", or gRPC
    # ModelInfer in closed loop: "h2load" (one fixed body) or "grpc" (bench.grpc_load)
    door: Door = "get"
    keys: Keys = "unique"
    rows: int = 1  # rows per request
    connections: int | None = None  # None: the --connections flag
    streams: int | None = None  # gRPC calls at once per connection; None: --grpc-streams
    needs_redis_control: bool = False  # kills the bench's own redis-server mid-run

    @property
    def grpc(self) -> bool:
        """Whether it calls the gRPC service (``keys`` hot or unique, ``rows`` per call)."""
        return self.engine in ("h2load", "grpc")

    @property
    def open_loop(self) -> bool:
        """Whether the fixed-rate generator runs it (``--open-loop``, ``--sweep``)."""
        return self.engine == "wrk" and self.connections is None and (
            not self.needs_redis_control)


def _door(door: Door, label: str) -> list[Scenario]:
    prefix = {"v1": "v1", "v2-json": "v2-json", "v2-bin": "v2-bin"}[door]
    out = [Scenario(f"{prefix}-hot", f"{label}, one row, asked again and again", "wrk", door,
                    "hot"),
           Scenario(f"{prefix}-unique", f"{label}, one new row per request", "wrk", door,
                    "unique"),
           Scenario(f"{prefix}-32-hot", f"{label}, the same 32 rows per request", "wrk", door,
                    "hot", rows=32)]
    if door != "v1":  # v1 with 32 new rows is "multirow"
        out.append(Scenario(f"{prefix}-32-unique", f"{label}, 32 new rows per request", "wrk",
                            door, "unique", rows=32))
    return out


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("hot", "GET /predict, one row, asked again and again", "wrk", keys="hot"),
    Scenario("unique", "GET /predict, every request a new row", "wrk"),
    Scenario("zipf", "GET /predict, 10,000 rows, Zipf-skewed (s=1.1)", "wrk", keys="zipf"),
    Scenario("multirow", "POST /v1, 32 new rows per request", "wrk", "v1", rows=32),
    Scenario("lowload", "GET /predict, one connection, every request a new row", "wrk",
             connections=1),
    Scenario("burst", "N identical new rows fired at once", "burst"),
    Scenario("redis-down", "zipf load; Redis killed halfway", "wrk", keys="zipf",
             needs_redis_control=True),
    *_door("v1", "POST /v1"),
    *_door("v2-json", "V2 infer, JSON"),
    *_door("v2-bin", "V2 infer, binary tensor"),
    Scenario("grpc-hot", "gRPC ModelInfer (h2load), one row, asked again and again", "h2load",
             keys="hot"),
    Scenario("grpc-unique", "gRPC ModelInfer, one new row per call", "grpc"),
    # One call per connection, as REST's multirow keeps one request per connection: 64 calls
    # of 32 rows are half of GATEWAY_MAX_QUEUE_ROWS (4096); 8 each would be 4x it, shed as
    # overload by design.
    Scenario("grpc-multirow", "gRPC ModelInfer, 32 new rows per call", "grpc", rows=32,
             streams=1),
)}
DEFAULT_SCENARIOS = ("hot", "unique", "zipf", "multirow", "lowload", "burst", "redis-down")
# Names that stand for several scenarios on the command line.
GROUPS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_SCENARIOS,
    "doors": ("multirow", *(s for s in SCENARIOS if s.startswith(("v1-", "v2-")))),
    "all": tuple(SCENARIOS),
    # The heavy workload (``--model lgbm-heavy`` or ``xgb-heavy``): the four mechanisms' loads,
    # and one and 32 new rows per V2 JSON request, the door a baseline server answers too.
    "heavy": ("unique", "zipf", "multirow", "burst", "v2-json-unique", "v2-json-32-unique"),
    # The gRPC door (raw FP64 tensors), beside REST's hot row for the ratio between them.
    "grpc": ("hot", "grpc-hot", "grpc-unique", "grpc-multirow"),
}
