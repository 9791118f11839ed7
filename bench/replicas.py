"""Workers or replicas, and the nginx hop's cost: ``python -m bench.replicas``.

Four configurations, all running during one invocation, driven by the same wrk loads:

* ``1 worker``  — wrk ─▶ one gateway (``python -m gateway``)
* ``2 workers`` — wrk ─▶ one gateway of two worker processes (``--workers 2``)
* ``nginx+1``   — wrk ─▶ nginx ─▶ the first gateway
* ``nginx+2``   — wrk ─▶ nginx ─▶ that gateway and a second one (two replicas)

nginx runs the shipped ``deploy/nginx/gateway.conf`` (one worker process), with only its listen
address and upstream servers replaced. Each repetition measures every configuration in turn, so
drifts in machine load touch them alike: one connection on the hot row for latency (the hop's
cost is the median latency of ``nginx+1`` minus that of ``1 worker``), then ``--connections``
for throughput on each load, during which the CPU time of nginx and of the gateways (workers
included) is read from ``/proc``. The loads are ``GET /predict`` of the default model: ``hot``,
one row again and again (answered from the in-process cache, where the proxy's share of the
work is largest), and ``unique``, a row never asked before each time (a model call per
request, batched).

wrk runs on the cores ``--wrk-cpus`` (default: core 0) with one thread per core; the gateways
and nginx on ``--server-cpus`` (default: every other core; ``all``: no pinning), so that the
load generator does not take the server's cores. ``2 workers / 1 worker`` and ``nginx+2 / 1
worker`` are throughput ratios taken within each repetition (paired), reported as median
(min-max).

The nginx helpers here (``nginx_process``, ``render_site``) are also what the deployment tests
start nginx with; gateways come from ``bench.procs``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.doors import Keys, Load
from bench.lua import script
from bench.machine import describe, process_cpu_s, summary
from bench.procs import Process, free_port, gateway_process, gateways
from bench.runner import features_at
from bench.wrk import WrkResult, run_wrk

__all__ = ["DEPLOY_DIR", "Nginx", "main", "nginx_binary", "nginx_process", "render_site"]

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
_NGINX_WORKER = re.compile(r"start worker process (\d+)")


def nginx_binary() -> str:
    """The nginx executable; RuntimeError saying how to install it when there is none."""
    exe = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if exe is None:
        raise RuntimeError("nginx not found: install it (apt-get install nginx; "
                           "`make test` does when run as root)")
    return exe


def render_site(conf: Path, *, listen: str, upstreams: Sequence[str],
                metrics_listen: str | None = None) -> str:
    """A shipped site config (``deploy/nginx/*.conf``) with its listen addresses and the
    ``server`` lines of ``upstream gateway`` replaced; every other line as shipped.

    Raises ValueError when the config no longer has the lines replaced here.
    """
    text = conf.read_text()

    def once(old: str, new: str) -> None:
        nonlocal text
        if text.count(old) != 1:
            raise ValueError(f"{conf}: expected {old!r} exactly once")
        text = text.replace(old, new)

    once("    listen 8080;", f"    listen {listen};")
    if "listen 9091;" in text:
        once("    listen 9091;", f"    listen {metrics_listen or '127.0.0.1:' + str(free_port())};")
    block = re.search(r"upstream gateway \{\n(.*?)\n\}", text, re.S)
    if block is None:
        raise ValueError(f"{conf}: no 'upstream gateway' block")
    lines = block.group(1).splitlines()
    servers = [m for line in lines if (m := re.match(r"\s*server\s+\S+(.*);$", line))]
    if not servers:
        raise ValueError(f"{conf}: no server line in 'upstream gateway'")
    params = servers[0].group(1)
    body = [f"    server {u}{params};" for u in upstreams]
    body += [line for line in lines if not re.match(r"\s*server\s", line)]
    return text[:block.start(1)] + "\n".join(body) + text[block.end(1):]


_MAIN_CONF = """daemon off;
master_process on;
worker_processes {workers};
{user}pid {dir}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/site.conf;
}}
"""


@dataclass
class Nginx:
    """A running nginx: its master process, worker PIDs and access log."""

    process: Process
    port: int
    workers: list[int]
    access_log: Path
    directory: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_lines(self, at_least: int = 0, timeout_s: float = 10) -> list[str]:
        """The access log's lines, once there are ``at_least`` (nginx writes a request's line
        just after sending its response); RuntimeError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = self.access_log.read_text().splitlines()
            if len(lines) >= at_least:
                return lines
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(lines)} access log lines, not {at_least}")
            os.sched_yield()

    def access_line(self, request_id: str, timeout_s: float = 10) -> str:
        """The access log line of the request with this ``X-Request-Id``, once written."""
        deadline = time.monotonic() + timeout_s
        needle = f"request_id={request_id}"
        while True:
            for line in self.access_log.read_text().splitlines():
                if needle in line.split(" "):
                    return line
            if time.monotonic() > deadline:
                raise RuntimeError(f"no access log line for request {request_id}")
            os.sched_yield()


@contextmanager
def nginx_process(site: str, port: int, directory: Path, *, workers: int = 1) -> Iterator[Nginx]:
    """nginx (master + ``workers`` worker processes, not daemonized) serving ``site`` (a
    rendered site config listening on ``port``), every path under ``directory``; its access
    log (the config's ``/dev/stdout``) in ``directory/access.log``. Yielded once its workers
    are started; stopped gracefully (SIGQUIT) when the context ends."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "site.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""  # else workers could not reach the dir
    (directory / "nginx.conf").write_text(
        _MAIN_CONF.format(workers=workers, user=user, dir=directory))
    log_path = directory / "access.log"
    with open(log_path, "w") as log:
        proc = Process([nginx_binary(), "-p", str(directory), "-c", str(directory / "nginx.conf")],
                       stdout=log)
        try:
            found = proc.wait_for(_NGINX_WORKER, count=workers, timeout_s=30)
            yield Nginx(proc, port, [int(m.group(1)) for m in found], log_path, directory)
        finally:
            proc.stop(signal.SIGQUIT)


# -- the bench ------------------------------------------------------------------------------

LOADS: tuple[Keys, ...] = ("hot", "unique")
CONFIGS = ("1 worker", "2 workers", "nginx+1", "nginx+2")
# A Host header for the requests a script builds when it loads (the hot row's), before wrk
# sets one: nginx refuses an HTTP/1.1 request without it (400), uvicorn does not.
_HOST = 'wrk.headers["Host"] = "127.0.0.1"\n'
_RATIOS = (("2 workers", "1 worker"), ("nginx+2", "1 worker"))


@dataclass(frozen=True)
class _Target:
    url: str
    nginx: list[int]  # nginx worker PIDs
    gateways: list[int]  # gateway PIDs (a supervisor's workers are counted with it)


def _cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` and their live descendants."""
    return sum(process_cpu_s(pid) or 0.0 for pid in pids)


def _demo_store(root: Path) -> None:
    from model_store import ModelStore
    from model_store.demo import IRIS_FEATURES, iris_data, train_iris

    ModelStore(root).register(train_iris(), "iris", features=IRIS_FEATURES,
                              train_rows=iris_data()[0])


def _spread(values: Sequence[float], digits: int = 1) -> str:
    return (f"{statistics.median(values):,.{digits}f} "
            f"({min(values):,.{digits}f}-{max(values):,.{digits}f})")


def parse_cpus(text: str) -> set[int] | None:
    """``"0"``, ``"1,2"``, ``"1-3"`` as a set of cores; ``"all"`` as None (no pinning).

    Raises ValueError for anything else or a core this machine lacks.
    """
    if text == "all":
        return None
    cores: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"cores {text!r}: expected e.g. 0, 1,3 or 0-3")
        cores.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    machine = set(range(os.cpu_count() or 1))
    if not cores or not cores <= machine:
        raise ValueError(f"cores {text!r}: this machine has {sorted(machine)}")
    return cores


def _pinned(cpus: set[int] | None) -> ExitStack:
    """This process (so every process it starts from now on) on ``cpus``, restored on exit."""
    stack = ExitStack()
    if cpus is not None:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)
        stack.callback(os.sched_setaffinity, 0, before)
    return stack


def run(model_root: Path | None, *, duration_s: int, connections: int, repetitions: int,
        wrk_cpus: set[int] | None = None, server_cpus: set[int] | None = None
        ) -> dict[str, Any]:
    """Measure the four configurations; the results as a JSON-ready dict. ``wrk_cpus`` and
    ``server_cpus``: the cores of wrk and of the servers (None: not pinned)."""
    machine = describe()
    salts = itertools.count(1)
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        if model_root is None:
            model_root = work / "models"
            _demo_store(model_root)
        env = {"GATEWAY_MODEL_ROOT": str(model_root)}
        stack.enter_context(_pinned(server_cpus))
        g1, g2 = stack.enter_context(gateways(2, env))
        pair = stack.enter_context(gateway_process(env, workers=2))
        conf = DEPLOY_DIR / "nginx" / "gateway.conf"
        fronts = {}
        for name, gws in (("nginx+1", [g1]), ("nginx+2", [g1, g2])):
            port = free_port()
            site = render_site(conf, listen=f"127.0.0.1:{port}",
                               upstreams=[g.upstream for g in gws])
            site = site.replace("access_log /dev/stdout gateway;", "access_log off;")
            fronts[name] = stack.enter_context(nginx_process(site, port, work / name))
        targets = {
            "1 worker": _Target(g1.url, [], [g1.process.pid]),
            "2 workers": _Target(pair.url, [], [pair.process.pid]),
            "nginx+1": _Target(fronts["nginx+1"].url, fronts["nginx+1"].workers,
                               [g1.process.pid]),
            "nginx+2": _Target(fronts["nginx+2"].url, fronts["nginx+2"].workers,
                               [g1.process.pid, g2.process.pid]),
        }
        features = features_at(g1.url, os.environ.get("GATEWAY_DEFAULT_MODEL", "iris"))
        threads = len(wrk_cpus) if wrk_cpus else None

        def wrk(target: _Target, keys: Keys, conns: int, seconds: float) -> WrkResult:
            salt = next(salts) if keys == "unique" else 0
            lua = _HOST + script(Load("get", keys, features, salt=salt))
            return run_wrk(target.url, lua,
                           duration_s=seconds, connections=conns, timeout_s=5,
                           threads=min(threads or conns, conns), cpus=wrk_cpus)

        for target in targets.values():  # warm: connections, caches, allocators
            for keys in LOADS:
                wrk(target, keys, connections, 1)
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for rep in range(repetitions):
            for name, target in targets.items():
                one = wrk(target, "hot", 1, duration_s)
                row: dict[str, float] = {"p50_us_1conn": one.latency_us[50.0],
                                         "errors": one.errors}
                for keys in LOADS:
                    before = _cpu_s(target.nginx), _cpu_s(target.gateways)
                    many = wrk(target, keys, connections, duration_s)
                    after = _cpu_s(target.nginx), _cpu_s(target.gateways)
                    row |= {
                        f"{keys}_rps": many.rps, f"{keys}_p99_us": many.latency_us[99.0],
                        f"{keys}_nginx_cpu_us_per_request":
                            (after[0] - before[0]) / max(1, many.requests) * 1e6,
                        f"{keys}_gateway_cpu_us_per_request":
                            (after[1] - before[1]) / max(1, many.requests) * 1e6,
                    }
                    row["errors"] += many.errors
                rows[name].append(row)
                print(f"rep {rep + 1}/{repetitions} {name:9s} hot {row['hot_rps']:9,.0f} req/s"
                      f"  unique {row['unique_rps']:9,.0f} req/s  1-conn p50 "
                      f"{row['p50_us_1conn']:,.0f} µs", file=sys.stderr, flush=True)
    hop = [n["p50_us_1conn"] - d["p50_us_1conn"]
           for n, d in zip(rows["nginx+1"], rows["1 worker"], strict=True)]
    ratios = {f"{a} / {b}": {keys: [x[f"{keys}_rps"] / y[f"{keys}_rps"]
                                    for x, y in zip(rows[a], rows[b], strict=True)]
                             for keys in LOADS}
              for a, b in _RATIOS}
    return {
        "cores": os.cpu_count(), "machine": machine, "machine_after": describe(),
        "wrk_cpus": sorted(wrk_cpus) if wrk_cpus else "all",
        "server_cpus": sorted(server_cpus) if server_cpus else "all",
        "duration_s": duration_s, "connections": connections, "repetitions": repetitions,
        "runs": rows, "ratios": ratios, "hop_us_p50": hop,
    }


def report(result: dict[str, Any]) -> str:
    """The results as Markdown: median (min-max) over the repetitions."""
    runs = result["runs"]
    cpus = (f"wrk on cores {result['wrk_cpus']}, servers on cores {result['server_cpus']}"
            if "wrk_cpus" in result else "")
    lines = [
        f"{summary(result['machine'])}; {cpus}; {result['repetitions']} repetitions of "
        f"{result['duration_s']} s per run, {result['connections']} connections; median "
        f"(min-max).",
        "",
        "| configuration | hot req/s | unique req/s | p50 µs, 1 connection | nginx CPU µs/req "
        "(hot) | gateway CPU µs/req (hot) | gateway CPU µs/req (unique) | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, reps in runs.items():
        col = {k: [r[k] for r in reps] for k in reps[0]}
        nginx_cpu = (_spread(col["hot_nginx_cpu_us_per_request"]) if name.startswith("nginx")
                     else "n/a")
        lines.append(
            f"| {name} | {_spread(col['hot_rps'], 0)} | {_spread(col['unique_rps'], 0)} "
            f"| {_spread(col['p50_us_1conn'], 0)} | {nginx_cpu} "
            f"| {_spread(col['hot_gateway_cpu_us_per_request'])} "
            f"| {_spread(col['unique_gateway_cpu_us_per_request'])} | {int(sum(col['errors']))} |")
    lines.append("")
    for pair, by_load in result["ratios"].items():
        lines.append(f"{pair}, throughput ratio per repetition: " + ", ".join(
            f"{keys} {_spread(values, 2)}" for keys, values in by_load.items()))
    lines += ["", f"nginx hop, added p50 latency at 1 connection: {_spread(result['hop_us_p50'])} "
                  "µs/request"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-root", type=Path,
                   help="model store (default: the demo Iris model in a temp store)")
    p.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--wrk-cpus", type=parse_cpus, default=parse_cpus("0"), metavar="CORES",
                   help="cores wrk runs on: 0, 0-1, 0,2 or all (default: 0)")
    p.add_argument("--server-cpus", metavar="CORES",
                   help="cores the gateways and nginx run on (default: every core not wrk's; "
                        "all: not pinned)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    try:
        nginx_binary()
        result = run(args.model_root, duration_s=args.duration, connections=args.connections,
                     repetitions=args.repetitions, wrk_cpus=args.wrk_cpus,
                     server_cpus=_server_cpus(args.server_cpus, args.wrk_cpus))
    except (RuntimeError, ValueError) as exc:
        p.exit(1, f"bench.replicas: {exc}\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(report(result))


def _server_cpus(text: str | None, wrk_cpus: set[int] | None) -> set[int] | None:
    """``--server-cpus``: as given, else every core wrk does not run on (None: not pinned, when
    wrk is not pinned or runs on every core)."""
    if text is not None:
        return parse_cpus(text)
    if wrk_cpus is None:
        return None
    return set(range(os.cpu_count() or 1)) - wrk_cpus or None


if __name__ == "__main__":
    main()
