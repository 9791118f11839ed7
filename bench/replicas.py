"""The nginx hop's cost and what replicas buy: ``python -m bench.replicas``.

Three configurations, all running during one invocation, driven by the same wrk load:

* ``direct``  — wrk ─▶ one gateway
* ``nginx+1`` — wrk ─▶ nginx ─▶ that gateway
* ``nginx+2`` — wrk ─▶ nginx ─▶ that gateway and a second one

nginx runs the shipped ``deploy/nginx/gateway.conf`` (one worker process), with only its listen
address and upstream servers replaced. Each repetition measures every configuration in turn, so
drifts in machine load touch all three alike: one connection for latency (the hop's cost is
the median latency of ``nginx+1`` minus that of ``direct``), then ``--connections`` for
throughput, during which the CPU time of nginx and of the gateways is read from ``/proc`` (the
hop's CPU cost per request). The load is one hot row of the default model (``GET /predict``,
answered from the in-process cache), where the proxy's share of the work is largest.

On a machine with few cores the load generator, nginx and the gateways share them: two
gateways cannot double throughput on two cores, and the report prints the core count.

The nginx helpers here (``nginx_process``, ``render_site``) are also what the deployment tests
start nginx with; gateways come from ``bench.procs``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.procs import Process, free_port, gateways

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
                if line.endswith(needle):
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

_LUA = """wrk.method = "GET"
wrk.path = "{path}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d, "
    .. "\\"p50_us\\": %d, \\"p99_us\\": %d, \\"mean_us\\": %.1f}}\\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    errors: int
    p50_us: int
    p99_us: int
    mean_us: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def _wrk(url: str, script: Path, *, connections: int, duration_s: int) -> Load:
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk not found: install it (apt-get install wrk)")
    out = subprocess.run([exe, "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout=5s",
                          "-s", str(script), url], capture_output=True, text=True, check=True,
                         timeout=duration_s + 60).stdout
    for line in out.splitlines():
        if line.startswith("BENCH_JSON "):
            d = json.loads(line.removeprefix("BENCH_JSON "))
            return Load(d["requests"], d["duration_us"] / 1e6, d["errors"], d["p50_us"],
                        d["p99_us"], d["mean_us"])
    raise RuntimeError(f"wrk printed no result:\n{out}")


def _cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / tick


def _demo_store(root: Path) -> None:
    from model_store import ModelStore
    from model_store.demo import IRIS_FEATURES, iris_data, train_iris

    ModelStore(root).register(train_iris(), "iris", features=IRIS_FEATURES,
                              train_rows=iris_data()[0])


def _hot_path(url: str) -> str:
    with httpx.Client(base_url=url, timeout=10) as client:
        models = client.get("/v1/models").json()["models"]
    default = os.environ.get("GATEWAY_DEFAULT_MODEL", "iris")
    model = next(m for m in models if m["name"] == default)
    return "/predict?" + "&".join(f"{f}=1.5" for f in model["features"])


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def run(model_root: Path | None, *, duration_s: int, connections: int,
        repetitions: int) -> dict[str, Any]:
    """Measure the three configurations; the results as a JSON-ready dict."""
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        if model_root is None:
            model_root = work / "models"
            _demo_store(model_root)
        env = {"GATEWAY_MODEL_ROOT": str(model_root)}
        g1, g2 = stack.enter_context(gateways(2, env))
        conf = DEPLOY_DIR / "nginx" / "gateway.conf"
        fronts = {}
        for name, gws in (("nginx+1", [g1]), ("nginx+2", [g1, g2])):
            port = free_port()
            site = render_site(conf, listen=f"127.0.0.1:{port}",
                               upstreams=[g.upstream for g in gws])
            site = site.replace("access_log /dev/stdout gateway;", "access_log off;")
            fronts[name] = stack.enter_context(nginx_process(site, port, work / name))
        configs: dict[str, tuple[str, list[int], list[int]]] = {
            "direct": (g1.url, [], [g1.process.pid]),
            "nginx+1": (fronts["nginx+1"].url, fronts["nginx+1"].workers, [g1.process.pid]),
            "nginx+2": (fronts["nginx+2"].url, fronts["nginx+2"].workers,
                        [g1.process.pid, g2.process.pid]),
        }
        script = work / "hot.lua"
        script.write_text(_LUA.format(path=_hot_path(g1.url)))
        for url, _, _ in configs.values():  # warm: connections, caches, allocators
            _wrk(url, script, connections=connections, duration_s=1)
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
        for rep in range(repetitions):
            for name, (url, nginx_pids, gw_pids) in configs.items():
                one = _wrk(url, script, connections=1, duration_s=duration_s)
                before = _cpu_s(nginx_pids), _cpu_s(gw_pids)
                many = _wrk(url, script, connections=connections, duration_s=duration_s)
                after = _cpu_s(nginx_pids), _cpu_s(gw_pids)
                rows[name].append({
                    "p50_us_1conn": one.p50_us, "mean_us_1conn": one.mean_us,
                    "rps": many.rps, "p99_us": many.p99_us,
                    "errors": one.errors + many.errors,
                    "nginx_cpu_us_per_request": (after[0] - before[0]) / many.requests * 1e6,
                    "gateway_cpu_us_per_request": (after[1] - before[1]) / many.requests * 1e6,
                })
                print(f"rep {rep + 1}/{repetitions} {name:8s} {many.rps:9,.0f} req/s  "
                      f"1-conn p50 {one.p50_us} µs", file=sys.stderr, flush=True)
    hop = [n["p50_us_1conn"] - d["p50_us_1conn"]
           for n, d in zip(rows["nginx+1"], rows["direct"], strict=True)]
    return {
        "cores": os.cpu_count(), "duration_s": duration_s, "connections": connections,
        "repetitions": repetitions, "runs": rows, "hop_us_p50": hop,
    }


def report(result: dict[str, Any]) -> str:
    """The results as Markdown: median (min-max) over the repetitions."""
    runs = result["runs"]
    lines = [
        f"{result['cores']} cores shared by wrk, nginx and the gateways; "
        f"{result['repetitions']} repetitions of {result['duration_s']} s; "
        f"median (min-max).",
        "",
        f"| configuration | req/s at {result['connections']} connections | p50 µs, 1 connection "
        "| nginx CPU µs/request | gateway CPU µs/request | errors |",
        "|---|---|---|---|---|---|",
    ]
    for name, reps in runs.items():
        col = {k: [r[k] for r in reps] for k in reps[0]}
        nginx_cpu = _spread(col["nginx_cpu_us_per_request"]) if name != "direct" else "n/a"
        lines.append(
            f"| {name} | {_spread(col['rps'])} | {_spread(col['p50_us_1conn'])} | {nginx_cpu} "
            f"| {_spread(col['gateway_cpu_us_per_request'])} | {int(sum(col['errors']))} |")
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
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    try:
        nginx_binary()
        result = run(args.model_root, duration_s=args.duration, connections=args.connections,
                     repetitions=args.repetitions)
    except RuntimeError as exc:
        p.exit(1, f"bench.replicas: {exc}\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(report(result))


if __name__ == "__main__":
    main()
