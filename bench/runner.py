"""Run scenarios against gateway configurations, side by side, in one invocation."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import clients, lua
from bench.procs import Service, gateway, redis_server, uvicorn_app
from bench.scenarios import CONFIGS, SCENARIOS, Scenario
from bench.scrape import Counters, scrape
from bench.wrk import WrkResult, run_wrk
from bench.zipf import ZipfSampler
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES, iris_data, train_heavy, train_iris

__all__ = ["Options", "Run", "run_bench"]

CEILING = "ceiling"
HOT_ROW = (5.1, 3.5, 1.4, 0.2)


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
    model_root: Path = Path("models")
    model: str = "iris"  # the default model of every gateway started: GET /predict asks it
    workers: int = 1


@dataclass
class Run:
    """One measured repetition of one scenario on one configuration."""

    config: str
    scenario: str
    rep: int
    requests: int
    seconds: float
    errors: int
    latency_us: dict[float, int] = field(default_factory=dict)
    counters: Counters | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config, "scenario": self.scenario, "rep": self.rep,
            "requests": self.requests, "seconds": self.seconds, "rps": self.rps,
            "errors": self.errors,
            "latency_us": {str(k): v for k, v in self.latency_us.items()},
            "counters": None if self.counters is None else {
                "model_calls": self.counters.model_calls,
                "model_rows": self.counters.model_rows,
                "coalesced": self.counters.coalesced,
                "hits": self.counters.hits,
                "lookups": self.counters.lookups,
                "redis_errors": self.counters.redis_errors,
            },
        }


class _Salts:
    """Distinct row salts: wrk scripts take 1..599, Python clients 9600..9999."""

    def __init__(self) -> None:
        self._wrk = itertools.count(1)
        self._py = itertools.count(9600)

    def wrk(self) -> int:
        s = next(self._wrk)
        if s >= lua.MAX_SALT:
            raise RuntimeError("too many runs in one invocation for distinct unique rows")
        return s

    def py(self) -> int:
        return next(self._py)


def ensure_model(root: Path, model: str) -> tuple[str, ...]:
    """The features of ``model`` in the store at ``root``; the demo models (``iris``,
    ``heavy``) are trained, compiled and registered when missing."""
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


def _zipf_rows(n: int, n_features: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    if n_features == 4:  # Iris-like ranges
        return np.round(rng.uniform([4, 2, 1, 0], [8, 4.5, 7, 2.5], size=(n, 4)), 2)
    return np.round(rng.normal(size=(n, n_features)), 2)


class Bench:
    """State of one invocation: options, salts, progress callback, results."""

    def __init__(self, opts: Options, progress: Callable[[str], None],
                 features: tuple[str, ...] = IRIS_FEATURES) -> None:
        self.opts = opts
        self.features = features
        self.progress = progress
        self.salts = _Salts()
        self.runs: list[Run] = []
        self.open_loop: list[dict[str, Any]] = []
        self.redis: Service | None = None
        sampler = ZipfSampler(opts.zipf_rows, opts.zipf_s)
        self._zipf_rows = _zipf_rows(opts.zipf_rows, len(features))
        self._zipf_cdf = sampler.cdf

    # -- scripts -------------------------------------------------------------------------------
    def _script(self, name: str) -> str:
        f = self.features
        if name == "hot":
            return lua.hot(HOT_ROW if f == IRIS_FEATURES else self._zipf_rows[0].tolist(), f)
        if name in ("unique", "lowload"):
            return lua.unique(self.salts.wrk(), f)
        if name in ("zipf", "redis-down"):
            return lua.zipf(self._zipf_rows.tolist(), self._zipf_cdf.tolist(), self.salts.wrk(),
                            f)
        if name == "multirow":
            return lua.multirow(self.salts.wrk(), model=self.opts.model, features=f)
        raise ValueError(name)

    # -- one scenario on one target ------------------------------------------------------------
    def scenario(self, config: str, url: str, sc: Scenario, *, metrics: bool) -> None:
        opts = self.opts
        conns = sc.connections or opts.connections
        if sc.engine == "wrk" and opts.warmup_s > 0:
            self.progress(f"{config} · {sc.name} · warm-up")
            run_wrk(url, self._script(sc.name), duration_s=opts.warmup_s, connections=conns)
        for rep in range(opts.repetitions):
            self.progress(f"{config} · {sc.name} · run {rep + 1}/{opts.repetitions}")
            before = scrape(url) if metrics else None
            if sc.engine == "burst":
                b = clients.burst(url, opts.burst_size, self.salts.py(), self.features)
                run = Run(config, sc.name, rep, b.requests, b.seconds, b.errors)
            else:
                killer = self._kill_redis_midway() if sc.needs_redis_control else None
                result: WrkResult = run_wrk(url, self._script(sc.name),
                                            duration_s=opts.duration_s, connections=conns)
                if killer is not None:
                    killer.join()
                    self._restart_redis()
                run = Run(config, sc.name, rep, result.requests, result.duration_s,
                          result.errors, result.latency_us)
            after = scrape(url) if metrics else None
            if before is not None and after is not None:
                run.counters = after - before
            self.runs.append(run)

    def _kill_redis_midway(self) -> threading.Thread:
        assert self.redis is not None
        redis = self.redis
        t = threading.Timer(self.opts.duration_s / 2, redis.kill)
        t.start()
        return t

    def _restart_redis(self) -> None:
        assert self.redis is not None
        self.redis.start()

    # -- targets -------------------------------------------------------------------------------
    def target(self, config: str, url: str, *, metrics: bool, get_only: bool) -> None:
        for name in self.opts.scenarios:
            sc = SCENARIOS[name]
            if get_only and not sc.get_only:
                continue
            if sc.needs_redis_control and (
                    self.redis is None or CONFIGS.get(config, {}).get("GATEWAY_CACHE") != "on"):
                continue
            self.scenario(config, url, sc, metrics=metrics)
        for rate in self.opts.open_loop_rates:
            self.progress(f"{config} · open loop · {rate:g}/s")
            r = clients.open_loop(url, rate, self.opts.duration_s, self.salts.py(),
                                  lua.PERCENTILES, self.features)
            self.open_loop.append({"config": config, "rate": rate, "sent": r.sent,
                                   "errors": r.errors,
                                   "latency_us": {str(k): v for k, v in r.latency_us.items()}})

    def ceiling(self, url: str) -> None:
        """The hot load against the bare endpoint (it answers any query string)."""
        self.scenario(CEILING, url, SCENARIOS["hot"], metrics=False)


def run_bench(opts: Options, progress: Callable[[str], None]) -> Bench:
    """Measure every configuration (or ``opts.url``), the ceiling, and the baseline."""
    if opts.url is not None:
        features = features_at(opts.url.rstrip("/"), opts.model)
    else:
        features = ensure_model(opts.model_root, opts.model)
    bench = Bench(opts, progress, features)
    with contextlib.ExitStack() as stack:
        progress("ceiling · starting")
        ceiling = stack.enter_context(uvicorn_app("bench.ceiling:app"))
        bench.ceiling(ceiling.url)
        ceiling.stop()
        if opts.url is not None:
            bench.target("target", opts.url.rstrip("/"), metrics=True, get_only=False)
        else:
            if any(CONFIGS[c].get("GATEWAY_CACHE") == "on" for c in opts.configs):
                progress("redis-server · starting")
                bench.redis = stack.enter_context(redis_server())
            for config in opts.configs:
                progress(f"{config} · starting")
                for svc in _gateway(opts, config, bench.redis):
                    bench.target(config, svc.url, metrics=True, get_only=False)
        if opts.baseline_url is not None:
            bench.target("baseline", opts.baseline_url.rstrip("/"), metrics=False,
                         get_only=True)
    return bench


def _gateway(opts: Options, config: str, redis: Service | None) -> Iterator[Service]:
    env = {
        "GATEWAY_MODEL_ROOT": str(opts.model_root),
        "GATEWAY_DEFAULT_MODEL": opts.model,
        "GATEWAY_CACHE_PREFIX": f"bench-{config}",
        **CONFIGS[config],
    }
    if redis is not None and CONFIGS[config].get("GATEWAY_CACHE") == "on":
        env["GATEWAY_REDIS_URL"] = redis.url
    with gateway(env, workers=opts.workers) as svc:
        yield svc
