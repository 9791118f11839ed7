"""``python -m bench.ab``: two source trees of the gateway under the same closed-loop load, their
runs interleaved (A, B, A, B, …) so that whatever else the machine does weighs on both alike.

For a change to the request path: check out the commit before it (``git worktree add /tmp/a
<commit>``) and compare it with the working tree::

    python -m bench.ab --a /tmp/a --b . --scenarios hot,unique,zipf,multirow --repetitions 5

Each tree serves the demo model (``--model-root``) in one process of ``python -m gateway``
imported from that tree (``PYTHONPATH``, and ``PYTHONSAFEPATH`` so the current directory does
not shadow it), with one of the bench's configurations (``full`` by default; no Redis). Prints,
per scenario, each side's median req/s over the repetitions with its range, and B's median as a
share of A's.

One tree against itself with other settings: ``--env-b`` (and ``--env-a``) add ``GATEWAY_*``
variables to one side, ``--workers-b`` (``--workers-a``) serves one side with that many worker
processes; ``--redis`` starts a redis-server of the run's own and gives both sides
``GATEWAY_REDIS_URL`` (each its own key prefix, so neither finds the other's values);
``--otlp-sink`` runs ``bench.otlp_sink`` for the run and points both sides'
``GATEWAY_TRACING_ENDPOINT`` at it. What tracing costs::

    python -m bench.ab --a . --b . --otlp-sink --env-b GATEWAY_TRACING=on \
        --env-b GATEWAY_TRACING_SAMPLE_RATIO=0.01 --scenarios hot,unique,zipf
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from bench import lua
from bench.doors import Load
from bench.procs import Process, free_port, gateways, redis_server
from bench.runner import features_at
from bench.scenarios import CONFIGS, SCENARIOS, Scenario
from bench.wrk import run_wrk

__all__ = ["cell", "main", "settings_of"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, required=True, help="the first source tree (before)")
    p.add_argument("--b", type=Path, required=True, help="the second source tree (after)")
    p.add_argument("--model-root", type=Path, default=Path("models"))
    p.add_argument("--model", default="iris")
    p.add_argument("--config", choices=[c for c, e in CONFIGS.items()], default="full")
    p.add_argument("--scenarios", default="hot,unique,zipf,multirow")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per side")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--env-a", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable of side A only (repeatable)")
    p.add_argument("--env-b", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable of side B only (repeatable)")
    p.add_argument("--workers-a", type=int, default=1, help="worker processes of side A")
    p.add_argument("--workers-b", type=int, default=1, help="worker processes of side B")
    p.add_argument("--redis", action="store_true",
                   help="both sides share a redis-server started for the run")
    p.add_argument("--otlp-sink", action="store_true",
                   help="export both sides' spans to an OTLP/HTTP endpoint that discards them")
    args = p.parse_args(argv)
    extra = {"A": settings_of(p, args.env_a), "B": settings_of(p, args.env_b)}
    names = args.scenarios.split(",")
    for name in names:
        if name not in SCENARIOS or SCENARIOS[name].engine != "wrk":
            p.error(f"--scenarios: {name!r} is not a closed-loop scenario")
    base = {"GATEWAY_MODEL_ROOT": str(args.model_root.resolve()), "GATEWAY_MODEL_POLL_S": "0",
            "GATEWAY_DEFAULT_MODEL": args.model, "PYTHONSAFEPATH": "1", **CONFIGS[args.config]}
    salt = 1000
    with ExitStack() as stack:
        if args.otlp_sink:
            port = free_port()
            sink = Process([sys.executable, "-m", "bench.otlp_sink", "--port", str(port)],
                           stdout=subprocess.STDOUT)
            stack.callback(lambda: print("OTLP sink: "
                                         + sink.wait_for(r"\d+ exports.*")[0].group(0)))
            stack.callback(sink.send, signal.SIGTERM)
            sink.wait_for("OTLP sink on")
            base["GATEWAY_TRACING_ENDPOINT"] = f"http://127.0.0.1:{port}/v1/traces"
        if args.redis:
            base["GATEWAY_REDIS_URL"] = stack.enter_context(redis_server()).url
        sides = {}
        workers = {"A": args.workers_a, "B": args.workers_b}
        for side, tree in (("A", args.a), ("B", args.b)):
            (gw,) = stack.enter_context(gateways(1, {
                **base, "GATEWAY_CACHE_PREFIX": f"ab-{side}", **extra[side],
                "PYTHONPATH": str(tree.resolve())}, workers=workers[side]))
            sides[side] = gw.url
        features = features_at(sides["A"], args.model)
        print(f"A: {args.a} {' '.join(args.env_a)} ({args.workers_a} worker(s))  "
              f"B: {args.b} {' '.join(args.env_b)} ({args.workers_b} worker(s))  "
              f"config {args.config}{' + Redis' if args.redis else ''}, "
              f"{args.repetitions} x {args.duration:g} s, {args.connections} connections")
        print(f"{'scenario':<18} {'A req/s median [range]':>30} {'B req/s median [range]':>30}"
              f" {'B/A':>6}")
        for name in names:
            sc = SCENARIOS[name]
            rates: dict[str, list[float]] = {"A": [], "B": []}
            if args.warmup > 0:
                for side in ("A", "B"):
                    _rate(sides[side], sc, features, args, args.warmup, salt)
            for rep in range(args.repetitions):
                salt += 1  # new rows for every run (the same for both sides)
                order = ("A", "B") if rep % 2 == 0 else ("B", "A")
                for side in order:
                    rates[side].append(_rate(sides[side], sc, features, args, args.duration,
                                             salt))
            a, b = (statistics.median(rates[s]) for s in ("A", "B"))
            print(f"{name:<18} {cell(rates['A']):>30} {cell(rates['B']):>30} {b / a:>6.3f}")


def settings_of(p: argparse.ArgumentParser, pairs: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` pairs as a dict; a pair without ``=`` or a name is a usage error."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            p.error(f"expected NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def _rate(url: str, sc: Scenario, features: tuple[str, ...], args: argparse.Namespace,
          seconds: float, salt: int) -> float:
    """Requests per second of one wrk run of ``sc`` against ``url``."""
    load = Load(door=sc.door, keys=sc.keys, features=features, rows=sc.rows, model=args.model,
                salt=salt, seed=salt)
    result = run_wrk(url, lua.script(load), duration_s=seconds, connections=args.connections)
    if result.errors:
        raise SystemExit(f"{url} {sc.name}: {result.errors} errors")
    return result.requests / result.duration_s


def cell(rates: list[float]) -> str:
    """The median of ``rates`` and their range, as the tables print them."""
    return f"{statistics.median(rates):,.0f} [{min(rates):,.0f} to {max(rates):,.0f}]"


if __name__ == "__main__":
    main()
