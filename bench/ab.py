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
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack
from pathlib import Path

from bench import lua
from bench.doors import Load
from bench.procs import gateways
from bench.runner import features_at
from bench.scenarios import CONFIGS, SCENARIOS, Scenario
from bench.wrk import run_wrk

__all__ = ["main"]


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
    args = p.parse_args(argv)
    names = args.scenarios.split(",")
    for name in names:
        if name not in SCENARIOS or SCENARIOS[name].engine != "wrk":
            p.error(f"--scenarios: {name!r} is not a closed-loop scenario")
    base = {"GATEWAY_MODEL_ROOT": str(args.model_root.resolve()), "GATEWAY_MODEL_POLL_S": "0",
            "PYTHONSAFEPATH": "1", **CONFIGS[args.config]}
    salt = 1000
    with ExitStack() as stack:
        sides = {}
        for side, tree in (("A", args.a), ("B", args.b)):
            (gw,) = stack.enter_context(gateways(1, {**base, "PYTHONPATH": str(tree.resolve())}))
            sides[side] = gw.url
        features = features_at(sides["A"], args.model)
        print(f"A: {args.a}  B: {args.b}  config {args.config}, {args.repetitions} x "
              f"{args.duration:g} s, {args.connections} connections")
        print(f"{'scenario':<10} {'A req/s median [range]':>30} {'B req/s median [range]':>30}"
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
            print(f"{name:<10} {_cell(rates['A']):>30} {_cell(rates['B']):>30} {b / a:>6.3f}")


def _rate(url: str, sc: Scenario, features: tuple[str, ...], args: argparse.Namespace,
          seconds: float, salt: int) -> float:
    """Requests per second of one wrk run of ``sc`` against ``url``."""
    load = Load(door=sc.door, keys=sc.keys, features=features, rows=sc.rows, model=args.model,
                salt=salt, seed=salt)
    result = run_wrk(url, lua.script(load), duration_s=seconds, connections=args.connections)
    if result.errors:
        raise SystemExit(f"{url} {sc.name}: {result.errors} errors")
    return result.requests / result.duration_s


def _cell(rates: list[float]) -> str:
    return f"{statistics.median(rates):,.0f} [{min(rates):,.0f} to {max(rates):,.0f}]"


if __name__ == "__main__":
    main()
