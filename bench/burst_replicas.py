"""Model calls per burst over replicas: ``python -m bench.burst_replicas``.

The ``burst-replicas`` scenario. For 1 and 3 gateway replicas sharing one redis-server, with
cross-replica coalescing on (``GATEWAY_COALESCE_REMOTE=auto``, the default) and off:

* **identical**: ``--burst`` requests for one new row, spread evenly over the replicas, every
  connection opened first and then every request written in one pass (all leave within a few
  milliseconds); model calls per burst are read from each replica's ``/metrics``;
* **distinct**: ``--rows`` new rows, each sent to two different replicas (to the only one with
  one replica) in one burst; rows computed per burst (``gateway_model_rows_total``).

Before the first burst every replica is warmed with ordinary traffic (``--warm`` new rows,
each asked of every replica in turn), so calls are measured and placed as in service; each
repetition then uses new rows. The model is an Iris forest of 1,000 trees on its scikit-learn
backend (``train_iris(trees=1000)``: milliseconds a call, more than a Redis lookup costs on any
machine, so with the default settings Redis is consulted and coalescing applies; the demo's 100
trees cost about the lookup on a fast one); every answer is checked against the estimator.
Prints a Markdown table (and writes JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench.procs import GatewayProcess, gateway_process, redis_server
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES, train_iris

_SAMPLE = re.compile(r"^(gateway_model_(?:calls|rows)_total)\{[^}]*\} (\S+)$", re.M)


@dataclass
class Result:
    replicas: int
    remote: str
    calls_per_identical_burst: list[int]
    rows_per_distinct_burst: list[int]
    distinct_rows: int
    wrong_answers: int


def _totals(gateways: Sequence[GatewayProcess]) -> dict[str, float]:
    out = {"gateway_model_calls_total": 0.0, "gateway_model_rows_total": 0.0}
    for gw in gateways:
        for name, value in _SAMPLE.findall(httpx.get(f"{gw.url}/metrics", timeout=10).text):
            out[name] += float(value)
    return out


def _request(port: int, row: list[float]) -> tuple[int, bytes]:
    body = orjson.dumps({"instances": [row]})
    head = (f"POST /v1/models/iris/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return port, head + body


async def _fire(requests: list[tuple[int, bytes]]) -> list[Any]:
    """Open every connection, then write every request in one pass; the predictions (None for
    a failed request), in order."""
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                   for port, _ in requests))
    for (_, writer), (_, raw) in zip(conns, requests, strict=True):
        writer.write(raw)

    async def read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        return orjson.loads(body)["predictions"][0]

    return list(await asyncio.gather(*(read(r, w) for r, w in conns)))


@contextmanager
def _deployment(store: Path, replicas: int, remote: str) -> Iterator[list[GatewayProcess]]:
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server())
        env = {"GATEWAY_MODEL_ROOT": str(store), "GATEWAY_REDIS_URL": redis.url,
               "GATEWAY_BACKEND": "library", "GATEWAY_COALESCE_REMOTE": remote,
               "GATEWAY_MODEL_POLL_S": "0"}
        yield [stack.enter_context(gateway_process(env)) for _ in range(replicas)]


def run_config(store: Path, estimator: Any, rows: np.ndarray, *, replicas: int, remote: str,
               burst: int, distinct: int, repetitions: int, warm: int = 0) -> Result:
    result = Result(replicas, remote, [], [], distinct, 0)
    with _deployment(store, replicas, remote) as gws:
        ports = [int(gw.url.rsplit(":", 1)[1]) for gw in gws]
        cursor = 0
        for row in rows[:warm].tolist():  # ordinary traffic first: calls measured, placed
            for port in ports:
                result.wrong_answers += asyncio.run(_fire([_request(port, row)]))[0] is None
        cursor = warm
        for _ in range(repetitions):
            row = rows[cursor]
            cursor += 1
            expected = estimator.predict(row[None, :]).tolist()[0]
            before = _totals(gws)
            got = asyncio.run(_fire([_request(ports[i % replicas], row.tolist())
                                     for i in range(burst)]))
            result.wrong_answers += sum(g != expected for g in got)
            result.calls_per_identical_burst.append(
                round(_totals(gws)["gateway_model_calls_total"]
                      - before["gateway_model_calls_total"]))

            block = rows[cursor:cursor + distinct]
            cursor += distinct
            want = estimator.predict(block).tolist()
            before = _totals(gws)
            requests = []
            for i, r in enumerate(block.tolist()):
                requests += [_request(ports[i % replicas], r),
                             _request(ports[(i + 1) % replicas], r)]
            got = asyncio.run(_fire(requests))
            result.wrong_answers += sum(g != w for g, w in zip(got, [x for x in want
                                                                     for _ in range(2)],
                                                               strict=True))
            result.rows_per_distinct_burst.append(
                round(_totals(gws)["gateway_model_rows_total"]
                      - before["gateway_model_rows_total"]))
    return result


def _spread(values: list[int]) -> str:
    return (f"{statistics.mean(values):.2f} ({min(values)}-{max(values)})"
            if values else "-")


def report(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"burst-replicas: {args.burst} identical requests per burst; {args.rows} distinct rows "
        f"sent twice per burst; {args.repetitions} bursts each; {os.cpu_count()} cores",
        "",
        "| replicas | remote coalescing | model calls per identical burst, mean (min-max) "
        "| rows computed per distinct burst | wrong answers |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(f"| {r.replicas} | {r.remote} | {_spread(r.calls_per_identical_burst)} "
                     f"| {_spread(r.rows_per_distinct_burst)} of {r.distinct_rows} "
                     f"| {r.wrong_answers} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.burst_replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=200, help="identical requests per burst")
    parser.add_argument("--rows", type=int, default=100, help="distinct rows per burst")
    parser.add_argument("--repetitions", type=int, default=10, help="bursts per configuration")
    parser.add_argument("--warm", type=int, default=50,
                        help="new rows asked of every replica before the first burst")
    parser.add_argument("--replicas", default="1,3", help="replica counts, comma-separated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    estimator = train_iris(trees=1000)
    rng = np.random.default_rng(12)
    need = args.warm + args.repetitions * (1 + args.rows)
    rows = np.round(rng.uniform([4, 2, 1, 0], [8, 4.5, 7, 2.5], size=(need, 4)), 3)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "models"
        ModelStore(store).register(estimator, "iris", features=IRIS_FEATURES, backend="sklearn")
        for replicas in (int(n) for n in args.replicas.split(",")):
            for remote in ("off", "auto"):
                results.append(run_config(store, estimator, rows, replicas=replicas,
                                          remote=remote, burst=args.burst, distinct=args.rows,
                                          repetitions=args.repetitions, warm=args.warm))
                print(report(results[-1:], args).splitlines()[-1], flush=True)
    print()
    print(report(results, args))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
