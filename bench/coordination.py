"""``python -m bench.coordination``: what coordinating a block of new rows across replicas
costs the event loop, apart from the model, the HTTP path and the load generator.

It starts a redis-server of its own on a free port, opens the gateway's runtime on it
(``GATEWAY_*`` settings from the environment, the model from ``--model-root`` and ``--model``)
and runs ``--blocks`` blocks of ``--rows`` new rows through ``Remote.compute`` (the lease
script that is the block's Redis lookup, then the script storing, freeing and announcing the
values), ``--concurrency`` at a time, with a local computation that answers at once. It prints
the loop thread's CPU time per block and per row, the median of ``--repeats`` rounds with
their minimum and maximum, and redis-server's CPU per block; it fails unless every row was
leased (coordinated, not computed alone because Redis was skipped). Two source trees compare by
running it under each, alternately::

    for i in 1 2 3; do for t in /tmp/a .; do
        PYTHONPATH=$t PYTHONSAFEPATH=1 python -m bench.coordination --model-root models; done; done
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import numpy as np

from bench.doors import MAX_SALT, unique_rows
from bench.machine import process_cpu_s
from bench.procs import redis_server
from gateway.core.batcher import Failure
from gateway.core.keys import key_head, row_keys
from gateway.metrics import Metrics
from gateway.runtime import Gateway
from gateway.settings import Settings
from model_store import ModelStore

__all__ = ["main"]


async def _rounds(args: argparse.Namespace, url: str, redis_pid: int) -> list[tuple[float, float]]:
    """Per round: the loop's CPU seconds and redis-server's, per block."""
    settings = Settings(model_root=args.model_root, default_model=args.model, redis_url=url,
                        model_poll_s=0)
    metrics = Metrics()
    gw = await Gateway.open(settings, ModelStore(args.model_root), metrics)
    try:
        rt = gw.runtime(args.model)
        remote = gw.remote
        if remote is None:
            raise SystemExit("cross-replica coalescing is off (GATEWAY_COALESCE_REMOTE)")
        unit = rt.units(frozenset({"label", "probabilities"}))[0]
        head = key_head(settings.cache_prefix, rt.manifest.name, rt.manifest.digest,
                        rt.unit_tag(unit))
        answer = b'"x"'

        async def at_once(_unit: object, rows: np.ndarray) -> list[bytes | Failure]:
            return [answer] * len(rows)

        salt = int(time.time()) % MAX_SALT
        out = []
        for r in range(args.repeats):
            blocks = [unique_rows(salt, (r * args.blocks + i) * args.rows, args.rows,
                                  len(rt.manifest.features)) for i in range(args.blocks)]
            keys = [row_keys(head, b) for b in blocks]
            gate = asyncio.Semaphore(args.concurrency)

            async def one(keys: list[str], rows: np.ndarray, gate: asyncio.Semaphore) -> None:
                async with gate:
                    await remote.compute(rt, unit, keys, rows, at_once)

            redis0, cpu0 = process_cpu_s(redis_pid) or 0.0, time.thread_time()
            await asyncio.gather(*(one(k, b, gate) for k, b in zip(keys, blocks, strict=True)))
            cpu = time.thread_time() - cpu0
            redis = (process_cpu_s(redis_pid) or 0.0) - redis0
            out.append((cpu / args.blocks, redis / args.blocks))
        leased = metrics.registry.get_sample_value(
            "gateway_remote_leases_total", {"model": rt.manifest.name}) or 0
        if leased != args.repeats * args.blocks * args.rows:
            raise SystemExit(f"{leased:.0f} of {args.repeats * args.blocks * args.rows} rows were "
                             "leased: Redis was skipped or failed, the figures would not hold")
        return out
    finally:
        await gw.aclose()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.coordination", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-root", type=Path, default=Path("models"))
    p.add_argument("--model", default="iris")
    p.add_argument("--rows", type=int, default=32, help="rows per block (%(default)s)")
    p.add_argument("--blocks", type=int, default=2000, help="blocks per round (%(default)s)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="blocks coordinated at once (%(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="rounds (%(default)s)")
    args = p.parse_args(argv)
    if min(args.rows, args.blocks, args.concurrency, args.repeats) < 1:
        p.error("--rows, --blocks, --concurrency and --repeats must be >= 1")
    import uvloop

    with redis_server() as redis:
        assert redis.process is not None
        rounds = uvloop.run(_rounds(args, redis.url, redis.process.pid))
    loop = sorted(c for c, _ in rounds)
    med = statistics.median(loop)
    print(f"{args.model}: coordinating {args.rows}-row blocks costs the event loop "
          f"{med * 1e6:.0f} us a block ({loop[0] * 1e6:.0f}..{loop[-1] * 1e6:.0f}), "
          f"{med / args.rows * 1e6:.1f} us a row; redis-server "
          f"{statistics.median(r for _, r in rounds) * 1e6:.0f} us a block")


if __name__ == "__main__":
    main()
