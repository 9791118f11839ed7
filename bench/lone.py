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
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import lua
from bench.ab import cell, settings_of
from bench.doors import DOORS, Load
from bench.machine import thread_cpu_s
from bench.procs import gateways, redis_server
from bench.runner import ensure_model
from bench.scenarios import CONFIGS
from bench.wrk import run_wrk

__all__ = ["Run", "main"]


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
        spent = {t: after[t] - before.get(t, 0.0) for t in after}
        return cls(connections, requests / seconds, spent.get(pid, 0.0) / requests,
                   sum(spent.values()) / requests)


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
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting of the gateway's (repeatable)")
    args = p.parse_args(argv)
    extra = settings_of(p, args.env)
    counts = [int(c) for c in args.connections.split(",")]
    if not counts or min(counts) < 1 or args.repetitions < 1 or args.duration <= 0:
        p.error("connections, repetitions and duration must be positive")
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
        salt = 0
        for rep in range(args.repetitions):
            for c in counts if rep % 2 == 0 else counts[::-1]:
                salt += 1
                load = Load(door=args.door, keys=args.keys, features=features, rows=args.rows,
                            model=args.model, salt=salt, seed=salt)
                before = thread_cpu_s(pid)
                result = run_wrk(gw.url, lua.script(load), duration_s=args.duration,
                                 connections=c)
                after = thread_cpu_s(pid)
                if result.errors or not result.requests:
                    print(f"{c} connections: {result.errors} errors of {result.requests}",
                          file=sys.stderr)
                    return 1
                runs[c].append(Run.of(c, result.requests, result.duration_s, pid,
                                      before, after))
    print(f"{args.model} · {args.door} · {args.keys} rows, {args.rows} a request · "
          f"{'L1 only' if args.no_redis else 'Redis'}{''.join(' · ' + e for e in args.env)} · "
          f"{args.repetitions} x {args.duration:g} s; median [range]")
    print(f"{'connections':>11} {'req/s':>26} {'loop µs/request':>24} {'process µs/request':>24}")
    for c in counts:
        r = runs[c]
        print(f"{c:>11} {cell([x.rps for x in r]):>26} {cell([x.loop_s * 1e6 for x in r]):>24}"
              f" {cell([x.process_s * 1e6 for x in r]):>24}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
