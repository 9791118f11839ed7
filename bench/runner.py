"""Run scenarios against gateway configurations, side by side, in one invocation.

Three kinds of measurement, each on every target (the ceiling, each configuration's gateway,
a running ``--url``, a ``--baseline-url``):

* closed loop (wrk, ``--connections`` at once): throughput and its latencies;
* open loop at fixed rates (``--open-loop RATES``, ``bench.loadgen``): latency at a load;
* sweeps (``--sweep``): rising fixed rates until the p99 bound or errors (``bench.sweep``).

The gRPC scenarios run in closed loop on a target's gRPC address (a gateway started here gets
``GATEWAY_GRPC_PORT``; ``--grpc-address``, ``--grpc-baseline``, MLServer's own port): the hot
row from h2load (``bench.h2load``), new rows from ``bench.grpc_load``. Each run is checked
beyond its generator's word (``bench.grpc_runs``: a first call by a real client, the DATA bytes
h2load got back, the gateway's own count of calls by status code); a run with an error is
recorded as invalid, and is never a throughput.

Every wrk run records wrk's own CPU time; every generator run its lateness and CPU; every run
of a process the bench started, that process's CPU time.

Beside them, the model's own limit (``bench.limit``): the served backend's rows per second
in-process on 64-row calls, measured before the servers start and again after they stop.
``--mlserver`` starts MLServer on the same model files (``bench.mlserver``) as the baseline.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from bench import clients, grpc_runs, lua
from bench.doors import Load
from bench.grpc_load import Settings as GrpcSettings
from bench.grpc_messages import INFER, Bodies, frame
from bench.h2load import run_h2load
from bench.heavy import HEAVY, ensure_heavy
from bench.limit import Limit, measure
from bench.loadgen import Result
from bench.machine import describe, process_cpu_s
from bench.mlserver import baseline as mlserver_baseline
from bench.procs import (
    GatewayProcess,
    RedisServer,
    free_port,
    gateway_process,
    redis_server,
    uvicorn_app,
)
from bench.scenarios import CEILING, CONFIGS, SCENARIOS, Scenario
from bench.scrape import Counters, scrape
from bench.sweep import LADDER, Step, Sweep, run_sweep
from bench.wrk import WrkResult, run_wrk
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES, iris_data, train_heavy, train_iris

__all__ = ["CEILING", "Bench", "OpenRun", "Options", "Run", "run_bench"]


@dataclass(frozen=True)
class Options:
    configs: tuple[str, ...]
    scenarios: tuple[str, ...]
    duration_s: float = 5.0
    warmup_s: float = 1.0
    repetitions: int = 3
    connections: int = 64
    burst_size: int = 200
    zipf_rows: int = 10_000
    zipf_s: float = 1.1
    open_loop_rates: tuple[float, ...] = ()
    url: str | None = None  # measure this running gateway instead of starting configurations
    baseline_url: str | None = None
    baseline_model: str | None = None  # the model's name on the baseline (default: model)
    model_root: Path = Path("models")
    model: str = "iris"  # the default model of every gateway started: GET /predict asks it
    workers: int = 1
    v2_input: str = "input"
    v2_datatype: str = "FP64"
    # open loop and sweeps
    sweep: bool = False
    sweep_rates: tuple[float, ...] = LADDER
    p99_bound_ms: float = 50.0
    refine: int = 3
    open_connections: int = 16  # connections the generator opens before a run
    min_requests: int = 500  # a fixed-rate run lasts long enough to measure this many
    max_lateness_ms: float = 1.0
    max_lateness_share: float = 0.1
    drain_s: float = 1.0
    # fixed-rate runs at these fractions of the target's closed-loop req/s in the scenario
    open_loop_at: tuple[float, ...] = ()
    mlserver: bool = False  # start MLServer on the model's files as the baseline
    mlserver_venv: Path | None = None  # its virtualenv (default: bench.mlserver's)
    mlserver_batch: tuple[int, float] = (64, 0.002)  # max_batch_size, max_batch_time (s)
    grpc_address: str | None = None  # the gRPC service (host:port) of the ``url`` gateway
    grpc_baseline: str | None = None  # an Open Inference Protocol gRPC server (host:port)
    grpc_streams: int = 8  # gRPC runs: concurrent calls per connection (of ``connections``)


@dataclass
class Run:
    """One measured repetition of one closed-loop scenario (or burst) on one target."""

    config: str
    scenario: str
    rep: int
    requests: int
    seconds: float
    errors: int
    latency_us: dict[float, int] = field(default_factory=dict)
    counters: Counters | None = None
    generator_cpu_s: float | None = None  # the generator's own CPU seconds
    server_cpu_s: float | None = None  # the measured server's CPU seconds (if started here)
    threads: int = 0  # generator threads
    connections: int = 0
    rows: int = 1  # rows per request
    generator: str = "wrk"  # or "h2load", "grpc_load"
    streams: int = 1  # concurrent requests per connection
    lateness_p99_us: int | None = None  # the generator's own lateness (grpc_load)
    invalid: str | None = None  # why this run is not a throughput (errors), or None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config, "scenario": self.scenario, "rep": self.rep,
            "requests": self.requests, "seconds": self.seconds, "rps": self.rps,
            "rows_per_request": self.rows, "errors": self.errors,
            "latency_us": {f"{k:g}": v for k, v in self.latency_us.items()},
            "generator": {"engine": self.generator, "threads": self.threads,
                          "connections": self.connections, "streams": self.streams,
                          "cpu_s": self.generator_cpu_s,
                          "lateness_p99_us": self.lateness_p99_us},
            "server_cpu_s": self.server_cpu_s, "invalid": self.invalid,
            "counters": None if self.counters is None else {
                "model_calls": self.counters.model_calls,
                "model_rows": self.counters.model_rows,
                "coalesced": self.counters.coalesced,
                "hits": self.counters.hits,
                "lookups": self.counters.lookups,
                "redis_errors": self.counters.redis_errors,
            },
        }


@dataclass
class OpenRun:
    """One fixed-rate run of the generator on one target."""

    config: str
    scenario: str
    rep: int
    result: Result
    server_cpu_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "scenario": self.scenario, "rep": self.rep,
                "server_cpu_s": self.server_cpu_s, **self.result.to_json()}


@dataclass(frozen=True)
class Target:
    """Something measured: its name in reports, URL, PID (when started here), model."""

    name: str
    url: str
    pid: int | None
    metrics: bool  # answers /metrics like the gateway
    model: str
    grpc: str | None = None  # host:port of its Open Inference Protocol gRPC service


class _Salts:
    """Distinct salts for unique rows: one counter per row formula (wrk's and Python's rows
    never coincide, see ``bench.lua``)."""

    def __init__(self) -> None:
        self._wrk = itertools.count(1)
        self._py = itertools.count(1)

    def wrk(self) -> int:
        s = next(self._wrk)
        if s >= lua.MAX_SALT:
            raise RuntimeError("too many runs in one invocation for distinct unique rows")
        return s

    def py(self) -> int:
        return next(self._py)


def ensure_model(root: Path, model: str) -> tuple[str, ...]:
    """The features of ``model`` in the store at ``root``; the demo models (``iris``,
    ``heavy``) and the heavy boosters (``bench.heavy.HEAVY``) are trained, registered (and
    compiled or verified) when missing."""
    if model in HEAVY:
        return ensure_heavy(root, model)
    store = ModelStore(root)
    if not store.models().get(model):
        if model == "iris":
            store.register(train_iris(), "iris", features=IRIS_FEATURES,
                           train_rows=iris_data()[0])
        elif model == "heavy":
            estimator, rows = train_heavy()
            store.register(estimator, "heavy", train_rows=rows)
    return store.manifest(model, store.latest(model)).features


def features_at(url: str, model: str) -> tuple[str, ...]:
    """The features of ``model`` as a running gateway describes it."""
    for m in httpx.get(f"{url}/v1/models", timeout=10).json()["models"]:
        if m["name"] == model:
            return tuple(m["features"])
    raise RuntimeError(f"{url} does not serve model {model!r}")


class Bench:
    """State of one invocation: options, salts, progress callback, results."""

    def __init__(self, opts: Options, progress: Callable[[str], None],
                 features: tuple[str, ...] = IRIS_FEATURES) -> None:
        self.opts = opts
        self.features = features
        self.progress = progress
        self.salts = _Salts()
        self.runs: list[Run] = []
        self.open_runs: list[OpenRun] = []
        self.sweeps: list[Sweep] = []
        self.skipped: list[str] = []  # what a target could not be asked, and why
        self.redis: RedisServer | None = None
        self.machine = describe()
        self.machine_after: dict[str, Any] = {}
        self.limits: list[Limit] = []  # the model's own limit: before the servers, after

    def load(self, sc: Scenario, model: str, salt: int) -> Load:
        return Load(door=sc.door, keys=sc.keys, features=self.features, rows=sc.rows,
                    model=model, salt=salt, v2_input=self.opts.v2_input,
                    v2_datatype=self.opts.v2_datatype, zipf_n=self.opts.zipf_rows,
                    zipf_s=self.opts.zipf_s, seed=salt)

    # -- closed loop -----------------------------------------------------------------------
    def scenario(self, target: Target, sc: Scenario) -> None:
        opts = self.opts
        if sc.grpc:
            self.grpc_scenario(target, sc)
            return
        conns = sc.connections or opts.connections
        url = target.url
        if sc.engine == "wrk" and opts.warmup_s > 0:
            self.progress(f"{target.name} · {sc.name} · warm-up")
            run_wrk(url, lua.script(self.load(sc, target.model, self.salts.wrk())),
                    duration_s=opts.warmup_s, connections=conns)
        for rep in range(opts.repetitions):
            self.progress(f"{target.name} · {sc.name} · run {rep + 1}/{opts.repetitions}")
            before = scrape(url) if target.metrics else None
            cpu0 = _cpu(target)
            if sc.engine == "burst":
                b = clients.burst(url, opts.burst_size, self.salts.py(), self.features)
                run = Run(target.name, sc.name, rep, b.requests, b.seconds, b.errors)
            else:
                killer = self._kill_redis_midway() if sc.needs_redis_control else None
                result: WrkResult = run_wrk(
                    url, lua.script(self.load(sc, target.model, self.salts.wrk())),
                    duration_s=opts.duration_s, connections=conns)
                if killer is not None:
                    killer.join()
                    self._restart_redis()
                run = Run(target.name, sc.name, rep, result.requests, result.duration_s,
                          result.errors, result.latency_us, generator_cpu_s=result.cpu_s,
                          threads=result.threads, connections=result.connections,
                          rows=sc.rows)
            run.server_cpu_s = _delta(cpu0, _cpu(target))
            after = scrape(url) if target.metrics else None
            if before is not None and after is not None:
                run.counters = after - before
            self.runs.append(run)

    def grpc_scenario(self, target: Target, sc: Scenario) -> None:
        """Closed-loop gRPC runs of ``sc`` on ``target.grpc``: h2load posting one body, or
        ``bench.grpc_load`` sending new rows; each run checked (see the module doc)."""
        opts = self.opts
        assert target.grpc is not None
        first = grpc_runs.probe(target.grpc, self._bodies(sc, target, 0)[0], sc.rows)
        if first.error is not None:
            raise RuntimeError(f"{target.name}: {sc.name}: the first call {first.error}")
        runs = opts.repetitions
        streams = sc.streams or opts.grpc_streams
        n = 0
        if sc.engine == "h2load":  # the warm-up sets how many requests a run sends
            self.progress(f"{target.name} · {sc.name} · warm-up")
            warm = run_h2load(target.grpc, INFER, frame(self._bodies(sc, target, 0)[0]),
                              duration_s=max(1.0, opts.warmup_s),
                              connections=opts.connections, streams=streams)
            n = max(opts.min_requests, round(warm.rps * opts.duration_s))
        for rep in range(runs):
            self.progress(f"{target.name} · {sc.name} · run {rep + 1}/{runs}")
            before = scrape(target.url) if target.metrics else None
            codes = grpc_runs.call_codes(target.url) if target.metrics else None
            cpu0 = _cpu(target)
            if sc.engine == "h2load":
                h = run_h2load(target.grpc, INFER, frame(self._bodies(sc, target, 0)[0]),
                               requests=n, connections=opts.connections,
                               streams=streams, answer_bytes=first.answer_bytes)
                run = Run(target.name, sc.name, rep, h.done, h.duration_s, h.errors,
                          h.latency_us, generator_cpu_s=h.cpu_s, threads=1,
                          connections=h.connections, rows=sc.rows, generator="h2load",
                          streams=h.streams, invalid=h.invalid)
                answered = h.done if h.invalid is None else 0
            else:
                g = grpc_runs.generate(GrpcSettings(
                    address=target.grpc, keys=sc.keys, model=target.model,
                    n_features=len(self.features), rows=sc.rows, salt=self.salts.py(),
                    input_name=opts.v2_input, datatype=opts.v2_datatype,
                    duration_s=opts.duration_s, warmup_s=opts.warmup_s,
                    connections=opts.connections, streams=streams,
                    max_lateness_ms=opts.max_lateness_ms,
                    max_lateness_share=opts.max_lateness_share))
                run = Run(target.name, sc.name, rep, g.requests, g.seconds, g.errors,
                          g.latency_us, generator_cpu_s=g.cpu_s, threads=1,
                          connections=g.connections, rows=sc.rows, generator="grpc_load",
                          streams=g.streams, lateness_p99_us=g.lateness_us[99.0],
                          invalid=g.invalid)
                answered = g.sent - sum(g.codes.values())
            run.server_cpu_s = _delta(cpu0, _cpu(target))
            after = scrape(target.url) if target.metrics else None
            if before is not None and after is not None and codes is not None:
                run.counters = after - before
                verdict = grpc_runs.server_verdict(codes, grpc_runs.call_codes(target.url),
                                                   answered)
                run.invalid = run.invalid or verdict
            self.runs.append(run)

    def _bodies(self, sc: Scenario, target: Target, salt: int) -> Bodies:
        return Bodies(sc.keys, target.model, len(self.features), rows=sc.rows, salt=salt,
                      input_name=self.opts.v2_input, datatype=self.opts.v2_datatype)

    def _kill_redis_midway(self) -> threading.Thread:
        assert self.redis is not None
        redis = self.redis
        t = threading.Timer(self.opts.duration_s / 2, redis.kill)
        t.start()
        return t

    def _restart_redis(self) -> None:
        assert self.redis is not None
        self.redis.start()

    # -- open loop -------------------------------------------------------------------------
    def fixed_rate(self, target: Target, sc: Scenario, rate: float, rep: int, *,
                   duration_s: float, warmup_s: float) -> OpenRun:
        """One run of ``bench.loadgen`` (its own process) at ``rate`` on ``target``."""
        opts = self.opts
        load = self.load(sc, target.model, self.salts.py())
        cmd = [sys.executable, "-m", "bench.loadgen", "--url", target.url,
               "--rate", f"{rate:g}", "--duration", f"{duration_s:g}",
               "--warmup", f"{warmup_s:g}", "--door", load.door, "--keys", load.keys,
               "--rows", str(load.rows), "--model", load.model,
               "--features", ",".join(load.features), "--salt", str(load.salt),
               "--v2-input", load.v2_input, "--v2-datatype", load.v2_datatype,
               "--zipf-n", str(load.zipf_n), "--zipf-s", f"{load.zipf_s:g}",
               "--connections", str(opts.open_connections),
               "--max-lateness-ms", f"{opts.max_lateness_ms:g}",
               "--max-lateness-share", f"{opts.max_lateness_share:g}",
               "--drain", f"{opts.drain_s:g}", "--json"]
        if target.metrics:
            scrape(target.url)  # wait until the previous run's stragglers are answered
        cpu0 = _cpu(target)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=warmup_s + duration_s + opts.drain_s + 120)
        cpu1 = _cpu(target)
        if proc.returncode != 0:
            raise RuntimeError(f"bench.loadgen failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
        result = Result.from_json(json.loads(proc.stdout))
        run = OpenRun(target.name, sc.name, rep, result, _delta(cpu0, cpu1))
        self.open_runs.append(run)
        return run

    def _window(self, rate: float) -> float:
        """Seconds measured at ``rate``: the duration, or longer for ``min_requests`` (a p99
        over a few hundred requests is one stall)."""
        return max(self.opts.duration_s, self.opts.min_requests / rate)

    def open_loop(self, target: Target, sc: Scenario) -> None:
        for rate in self.opts.open_loop_rates:
            for rep in range(self.opts.repetitions):
                self.progress(f"{target.name} · {sc.name} · {rate:g}/s · run "
                              f"{rep + 1}/{self.opts.repetitions}")
                self.fixed_rate(target, sc, rate, rep, duration_s=self._window(rate),
                                warmup_s=self.opts.warmup_s)

    def open_loop_at(self, target: Target, sc: Scenario) -> None:
        """Fixed-rate runs at fractions of the req/s the target reached in the closed loop of
        this scenario (``open_loop_at``: 0.5 is half of its capacity)."""
        done = [r.rps for r in self.runs if (r.config, r.scenario) == (target.name, sc.name)]
        if not done or not self.opts.open_loop_at:
            return
        capacity = statistics.median(done)
        for fraction in self.opts.open_loop_at:
            rate = max(1.0, round(capacity * fraction))
            for rep in range(self.opts.repetitions):
                self.progress(f"{target.name} · {sc.name} · {fraction:g} of capacity "
                              f"({rate:g}/s) · run {rep + 1}/{self.opts.repetitions}")
                self.fixed_rate(target, sc, rate, rep, duration_s=self._window(rate),
                                warmup_s=self.opts.warmup_s)

    def sweep(self, target: Target, sc: Scenario) -> None:
        opts = self.opts

        def measure(rate: float) -> Step:
            runs = []
            for rep in range(opts.repetitions):
                self.progress(f"{target.name} · {sc.name} · sweep {rate:g}/s"
                              + (f" · run {rep + 1}" if opts.repetitions > 1 else ""))
                runs.append(self.fixed_rate(target, sc, rate, rep, duration_s=self._window(rate),
                                            warmup_s=opts.warmup_s))
            return Step(rate, [r.result for r in runs], [r.server_cpu_s for r in runs])

        self.sweeps.append(run_sweep(target.name, sc.name, measure, opts.sweep_rates,
                                     opts.p99_bound_ms, refine=opts.refine))

    # -- targets -----------------------------------------------------------------------------
    def target(self, target: Target, *, probe: bool = False) -> None:
        """Every selected scenario on ``target``; with ``probe``, only those whose door
        answers one request with 200 (a server that is not this gateway)."""
        for name in self.opts.scenarios:
            sc = SCENARIOS[name]
            if sc.needs_redis_control and (self.redis is None or CONFIGS.get(
                    target.name, {}).get("GATEWAY_CACHE") != "on"):
                continue
            if self.opts.sweep and not sc.open_loop:
                continue
            if not (target.grpc if sc.grpc else target.url):
                self.skipped.append(f"{target.name}: {sc.name} (no "
                                    f"{'gRPC' if sc.grpc else 'HTTP'} address)")
                continue
            if probe and not self._answers(target, sc):
                continue
            if self.opts.sweep:
                self.sweep(target, sc)
                continue
            self.scenario(target, sc)
            if sc.open_loop:
                self.open_loop(target, sc)
                self.open_loop_at(target, sc)

    def _answers(self, target: Target, sc: Scenario) -> bool:
        if sc.grpc:
            assert target.grpc is not None
            first = grpc_runs.probe(target.grpc, self._bodies(sc, target, 0)[0], sc.rows)
            if first.error is not None:
                self.skipped.append(f"{target.name}: {sc.name} (one call {first.error})")
            return first.error is None
        status = clients.probe(target.url, self.load(replace(sc, keys="hot"), target.model, 0))
        if status != 200:
            self.skipped.append(f"{target.name}: {sc.name} (one request answered "
                                f"{status or 'nothing'})")
        return status == 200

    def ceiling(self, target: Target) -> None:
        """The hot load of each door in use against the bare endpoint (it answers any
        query string and any body)."""
        doors = dict.fromkeys(SCENARIOS[n].door for n in self.opts.scenarios
                              if SCENARIOS[n].engine == "wrk")
        names = ["hot"] + [f"{d}-hot" for d in doors if d != "get"]
        for name in names:
            self.scenario(target, SCENARIOS[name])


def _cpu(target: Target) -> float | None:
    return None if target.pid is None else process_cpu_s(target.pid)


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _service_target(name: str, svc: GatewayProcess, model: str, *, metrics: bool,
                    grpc: str | None = None) -> Target:
    return Target(name, svc.url, svc.process.pid, metrics, model, grpc)


def run_bench(opts: Options, progress: Callable[[str], None]) -> Bench:
    """Measure the model's own limit, the ceiling, every configuration (or ``opts.url``), the
    baseline, and the model's own limit again."""
    if opts.url is not None:
        features = features_at(opts.url.rstrip("/"), opts.model)
    else:
        progress(f"{opts.model} · preparing (a heavy model is trained once)")
        features = ensure_model(opts.model_root, opts.model)
    bench = Bench(opts, progress, features)
    own_limit = opts.url is None or opts.mlserver
    if own_limit:
        progress(f"{opts.model} · the model's own limit")
        bench.limits.append(measure(opts.model_root, opts.model))
    configs = [c for c in opts.configs if c != CEILING]
    with contextlib.ExitStack() as stack:
        if CEILING in opts.configs or not opts.sweep:
            progress("ceiling · starting")
            with uvicorn_app("bench.ceiling:app") as svc:
                target = _service_target(CEILING, svc, opts.model, metrics=False)
                if opts.sweep:
                    bench.target(target)
                else:
                    bench.ceiling(target)
        if opts.url is not None:
            bench.target(Target("target", opts.url.rstrip("/"), None, True, opts.model,
                                opts.grpc_address))
        else:
            if any(CONFIGS[c].get("GATEWAY_CACHE") == "on" for c in configs):
                progress("redis-server · starting")
                bench.redis = stack.enter_context(redis_server())
            for config in configs:
                progress(f"{config} · starting")
                for svc, grpc in _gateway(opts, config, bench.redis):
                    bench.target(_service_target(config, svc, opts.model, metrics=True,
                                                 grpc=grpc))
        if opts.mlserver:
            progress("mlserver · starting (installed once into its own virtualenv)")
            size, wait_s = opts.mlserver_batch
            with mlserver_baseline(opts.model_root, [opts.model], venv=opts.mlserver_venv,
                                   max_batch_size=size, max_batch_time_s=wait_s) as svc:
                bench.target(_service_target("baseline", svc, opts.model, metrics=False,
                                             grpc=svc.grpc), probe=True)
        elif opts.baseline_url is not None or opts.grpc_baseline is not None:
            url = (opts.baseline_url or "").rstrip("/")
            bench.target(Target("baseline", url, None, False, opts.baseline_model or opts.model,
                                opts.grpc_baseline), probe=True)
    if own_limit:
        progress(f"{opts.model} · the model's own limit, again")
        bench.limits.append(measure(opts.model_root, opts.model))
    bench.machine_after = describe()
    return bench


def _gateway(opts: Options, config: str, redis: RedisServer | None
             ) -> Iterator[tuple[GatewayProcess, str | None]]:
    """The gateway of ``config``, and its gRPC address when a gRPC scenario is selected."""
    grpc_port = free_port() if any(SCENARIOS[s].grpc for s in opts.scenarios) else None
    env = {
        "GATEWAY_MODEL_ROOT": str(opts.model_root),
        "GATEWAY_DEFAULT_MODEL": opts.model,
        "GATEWAY_CACHE_PREFIX": f"bench-{config}",
        **CONFIGS[config],
    }
    if redis is not None and CONFIGS[config].get("GATEWAY_CACHE") == "on":
        env["GATEWAY_REDIS_URL"] = redis.url
    if grpc_port is not None:
        env["GATEWAY_GRPC_PORT"] = str(grpc_port)
    with gateway_process(env, workers=opts.workers) as svc:
        yield svc, None if grpc_port is None else f"127.0.0.1:{grpc_port}"
