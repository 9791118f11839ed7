"""``python -m bench.lone``: what a request costs the gateway when it arrives alone, against
when it arrives among many.

One gateway (the bench's ``compiled`` configuration, beside a redis-server of its own unless
``--no-redis``; ``--tree`` serves another source tree) answers ``--model`` through ``--door``;
wrk drives it in closed loops of each of ``--connections`` (1, 4 and 64 by default), with new
rows (``--keys unique``) or one row asked again and again (``--keys hot``). Each run reports its
requests/s and the CPU time that the event loop's thread, and the whole process, spent per
request (``/proc/<pid>/task/*/stat``), the median and range over ``--repetitions``.

Alone, a request pays for everything by itself: the loop's wake-up, its read and its write, a
model call of one row (inline, on the loop's own thread). Among many, the loop wakes once for
the requests that arrived together and their new rows share one call in the model's thread. A
fixed-rate load below capacity sends requests alone, so this ratio, not the closed-loop capacity,
says how much of a core a given rate takes.

``--at`` (fractions of the req/s of the largest closed loop) and ``--rates`` (req/s) add
fixed-rate runs (``bench.loadgen``) after the closed loops, on the same gateway: per run, its
latency percentiles from each request's due time, its largest latency and the share of a core
the event loop's thread and the process used, rows per model call, and whether the gateway
looked lone rows up in Redis at the run's end (``gateway_l2_consulted``). Runs are listed one by
one, not summarized: at a rate the loop can only just follow, some runs keep a standing queue
that others never form.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench import loadgen, lua
from bench.ab import cell, settings_of
from bench.doors import DOORS, Load, build
from bench.machine import thread_cpu_s
from bench.procs import GatewayProcess, gateways, redis_server
from bench.runner import ensure_model
from bench.scenarios import CONFIGS
from bench.scrape import scrape
from bench.wrk import run_wrk

__all__ = ["FixedRun", "Run", "main"]


@dataclass(frozen=True, slots=True)
class Run:
    """One closed-loop run: requests/s, and CPU seconds per request of the event loop's
    thread (the process's main thread) and of the whole process."""

    connections: int
    rps: float
    loop_s: float
    process_s: float

    @classmethod
    def of(cls, connections: int, requests: int, seconds: float, pid: int,
           before: dict[int, float], after: dict[int, float]) -> Run:
        spent = _spent(before, after)
        return cls(connections, requests / seconds, spent.get(pid, 0.0) / requests,
                   sum(spent.values()) / requests)


@dataclass(frozen=True, slots=True)
class FixedRun:
    """One fixed-rate run: its rate, latency percentiles and maximum (seconds, from each
    request's due time), whether the generator kept its schedule (``bench.loadgen``), requests
    not answered 2xx, the share of a core the event loop's thread and the process used, rows
    per model call (None: no call), and whether lone rows were looked up in Redis at its end
    (None: no Redis)."""

    rate: float
    p50_s: float
    p99_s: float
    max_s: float
    valid: bool
    bad: int
    loop_share: float
    process_share: float
    rows_per_call: float | None = None
    consulted: bool | None = None

    @classmethod
    def of(cls, result: loadgen.Result, seconds: float, pid: int, before: dict[int, float],
           after: dict[int, float], *, calls: float = 0.0, rows: float = 0.0,
           consulted: bool | None = None) -> FixedRun:
        spent = _spent(before, after)
        lat = result.latency_us
        return cls(result.rate, lat[50.0] / 1e6, lat[99.0] / 1e6, lat[100.0] / 1e6,
                   result.valid, result.bad, spent.get(pid, 0.0) / seconds,
                   sum(spent.values()) / seconds, rows / calls if calls else None, consulted)


def _spent(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    """CPU seconds each thread spent between two ``thread_cpu_s`` readings."""
    return {t: after[t] - before.get(t, 0.0) for t in after}


def _fixed_rate(gw: GatewayProcess, load: Load, rate: float, seconds: float) -> FixedRun:
    """One ``bench.loadgen`` run of ``load`` against ``gw`` at ``rate`` for ``seconds`` after
    one second of warm-up; the threads' shares are over the whole run, warm-up and drain
    included."""
    url, pid = gw.url, gw.process.pid
    settings = loadgen.Settings(url=url, rate=rate, duration_s=seconds, warmup_s=1.0,
                                connections=16)
    requests = build(load, settings.warm_requests + settings.measured_requests, "127.0.0.1")
    counted = scrape(url)
    before, start = thread_cpu_s(pid), time.perf_counter()
    result = loadgen.run(requests, settings)
    after, end = thread_cpu_s(pid), time.perf_counter()
    done = scrape(url)
    if counted is None or done is None:
        raise RuntimeError(f"no /metrics at {url}")
    made = done - counted
    return FixedRun.of(result, end - start, pid, before, after, calls=made.model_calls,
                       rows=made.model_rows, consulted=_consulted(gw.metrics()))


def _consulted(metrics: str) -> bool | None:
    """Whether a gateway's ``/metrics`` text says it looks lone rows up in Redis
    (``gateway_l2_consulted``, every model version served); None when it has no Redis."""
    found = [s.value for family in text_string_to_metric_families(metrics)
             for s in family.samples if s.name == "gateway_l2_consulted"]
    return all(v == 1 for v in found) if found else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lone",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model-root", type=Path, default=Path("models"))
    p.add_argument("--model", default="iris")
    p.add_argument("--door", choices=DOORS, default="v2-json")
    p.add_argument("--keys", choices=("unique", "hot"), default="unique")
    p.add_argument("--rows", type=int, default=1, help="rows per request")
    p.add_argument("--connections", default="1,4,64",
                   help="closed loops to run, comma-separated connection counts")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--tree", type=Path, help="the gateway's source tree (default: this one)")
    p.add_argument("--no-redis", action="store_true", help="L1 only")
    p.add_argument("--at", default="", metavar="FRACTIONS",
                   help="fixed-rate runs at these fractions of the largest closed loop's req/s")
    p.add_argument("--rates", default="", help="fixed-rate runs at these req/s")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting of the gateway's (repeatable)")
    args = p.parse_args(argv)
    extra = settings_of(p, args.env)
    counts = [int(c) for c in args.connections.split(",")]
    fractions = [float(f) for f in args.at.split(",") if f]
    rates = [float(r) for r in args.rates.split(",") if r]
    if not counts or min(counts) < 1 or args.repetitions < 1 or args.duration <= 0:
        p.error("connections, repetitions and duration must be positive")
    if min(fractions + rates, default=1) <= 0:
        p.error("fractions and rates must be positive")
    features = ensure_model(args.model_root, args.model)
    env = {**CONFIGS["compiled"], "GATEWAY_MODEL_ROOT": str(args.model_root.resolve()),
           "GATEWAY_DEFAULT_MODEL": args.model, "GATEWAY_CACHE_PREFIX": "lone", **extra}
    if args.tree is not None:
        env["PYTHONPATH"] = str(args.tree.resolve())
    with contextlib.ExitStack() as stack:
        if not args.no_redis:
            env["GATEWAY_REDIS_URL"] = stack.enter_context(redis_server()).url
        (gw,) = stack.enter_context(gateways(1, env))
        pid = gw.process.pid
        runs: dict[int, list[Run]] = {c: [] for c in counts}
        salts = itertools.count(1)

        def new_load() -> Load:  # a salt of its own: new rows for every run (unique keys)
            salt = next(salts)
            return Load(door=args.door, keys=args.keys, features=features, rows=args.rows,
                        model=args.model, salt=salt, seed=salt)

        for rep in range(args.repetitions):
            for c in counts if rep % 2 == 0 else counts[::-1]:
                before = thread_cpu_s(pid)
                result = run_wrk(gw.url, lua.script(new_load()), duration_s=args.duration,
                                 connections=c)
                after = thread_cpu_s(pid)
                if result.errors or not result.requests:
                    print(f"{c} connections: {result.errors} errors of {result.requests}",
                          file=sys.stderr)
                    return 1
                runs[c].append(Run.of(c, result.requests, result.duration_s, pid,
                                      before, after))
        capacity = statistics.median(r.rps for r in runs[max(counts)])
        fixed: list[FixedRun] = []
        for rate in [max(1.0, round(capacity * f)) for f in fractions] + rates:
            for _ in range(args.repetitions):
                fixed.append(_fixed_rate(gw, new_load(), rate, args.duration))
    print(f"{args.model} · {args.door} · {args.keys} rows, {args.rows} a request · "
          f"{'L1 only' if args.no_redis else 'Redis'}{''.join(' · ' + e for e in args.env)} · "
          f"{args.repetitions} x {args.duration:g} s; median [range]")
    print(f"{'connections':>11} {'req/s':>26} {'loop µs/request':>24} {'process µs/request':>24}")
    for c in counts:
        r = runs[c]
        print(f"{c:>11} {cell([x.rps for x in r]):>26} {cell([x.loop_s * 1e6 for x in r]):>24}"
              f" {cell([x.process_s * 1e6 for x in r]):>24}")
    if fixed:
        print(f"fixed rate, one line a run (capacity: {capacity:,.0f} req/s, the median of "
              f"{max(counts)} connections)")
        print(f"{'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'loop':>6} "
              f"{'process':>8} {'rows/call':>9} {'Redis':>9}  generator")
        for f in fixed:
            per_call = "-" if f.rows_per_call is None else f"{f.rows_per_call:.1f}"
            redis = {None: "-", True: "consulted", False: "skipped"}[f.consulted]
            print(f"{f.rate:>8,.0f} {f.p50_s * 1e3:>8.2f} {f.p99_s * 1e3:>8.2f} "
                  f"{f.max_s * 1e3:>8.2f} {f.loop_share:>6.0%} {f.process_share:>8.0%} "
                  f"{per_call:>9} {redis:>9}  "
                  f"{'on time' if f.valid else 'late: latencies are upper bounds'}"
                  f"{f', {f.bad} not 2xx' if f.bad else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
