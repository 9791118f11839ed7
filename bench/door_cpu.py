"""``python -m bench.door_cpu``: the event loop's time per request on the fast lane's path for a
cached row (``Doors.answer`` for ``GET /predict``: door match, decoding, L1, encoding, counting),
in process, without HTTP parsing or a load generator, so that a change of a microsecond shows.

Two source trees compare by running it under each, alternately::

    for i in 1 2 3; do for t in /tmp/a .; do
        PYTHONPATH=$t PYTHONSAFEPATH=1 python -m bench.door_cpu --model-root models; done; done

Prints the best and the median of ``--runs`` runs of ``--requests`` requests each, in µs per
request. Extra ``GATEWAY_*`` settings come from the environment (``GATEWAY_TRACING=on``...).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from gateway import Settings, create_app
from gateway.lane import doors_of

__all__ = ["main"]


async def _measure(root: Path, model: str, runs: int, requests: int) -> list[float]:
    app = create_app(Settings(model_root=root, model_poll_s=0, default_model=model))
    async with app.router.lifespan_context(app) as state:
        assert state is not None
        doors = doors_of(app)
        assert doors is not None
        gw = state["gateway"]
        features = gw.runtime(model).manifest.features
        query = "&".join(f"{name}=1.5" for name in features).encode()
        scope = {"type": "http", "method": "GET", "path": "/predict", "query_string": query,
                 "headers": [(b"host", b"gateway")], "state": dict(state)}
        found = doors.match(scope)
        assert found is not None and found[0] is not None
        item = (found[0], found[1], scope, b"")
        for _ in range(requests // 2):  # warm: the row is cached, the decoding memoized
            doors.answer([item])
        out = []
        for _ in range(runs):
            start = time.perf_counter()
            for _ in range(requests):
                doors.answer([item])
            out.append((time.perf_counter() - start) / requests * 1e6)
        return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.door_cpu",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model-root", type=Path, default=Path("models"))
    p.add_argument("--model", default="iris")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--requests", type=int, default=5000)
    args = p.parse_args(argv)
    us = asyncio.run(_measure(args.model_root, args.model, args.runs, args.requests))
    print(f"best {min(us):.2f} us, median {statistics.median(us):.2f} us per request")


if __name__ == "__main__":
    main()
