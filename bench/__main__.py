"""``python -m bench``: load-test gateway configurations side by side and write a report.

By default it starts everything itself (a redis-server, one gateway per configuration, the
bare ceiling endpoint, and with ``--mlserver`` an MLServer on the same model files) on free
loopback ports, and stops it all at the end. Beside every figure stands the model's own
limit: its served backend's rows/s in-process on 64-row calls (``bench.limit``).

The heavy workload: ``--model lgbm-heavy`` or ``--model xgb-heavy`` (500 trees of depth 8
on 100 features, trained from a fixed seed into ``--model-root`` when missing, see
``bench.heavy``) with ``--scenarios heavy``. Closed-loop
load comes from wrk; ``--open-loop RATES`` adds fixed-rate runs and ``--sweep`` replaces the
closed loop by latency-against-load curves, both from ``bench.loadgen``.

The gRPC door: ``--scenarios grpc`` (REST's hot row, then gRPC ``ModelInfer`` with the hot row
from h2load, one and 32 new rows per call from ``bench.grpc_load``), ``--connections`` x
``--grpc-streams`` calls at once; the baseline's gRPC service is ``--grpc-baseline`` or, with
``--mlserver``, MLServer's own.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.mlserver import RUNTIMES
from bench.report import (
    aggregate,
    columns,
    limit_of,
    table_cells,
    write_report,
    write_sweep_report,
)
from bench.runner import Bench, Options, run_bench
from bench.scenarios import CEILING, CONFIGS, DEFAULT_CONFIGS, DEFAULT_SCENARIOS, GROUPS, SCENARIOS
from bench.sweep import LADDER
from model_store import ModelStore


def _csv(choices: Mapping[str, object], groups: Mapping[str, tuple[str, ...]] | None = None
         ) -> Callable[[str], tuple[str, ...]]:
    groups = groups or {}

    def parse(text: str) -> tuple[str, ...]:
        names: list[str] = []
        for x in (x.strip() for x in text.split(",") if x.strip()):
            names += groups.get(x, (x,))
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join([*choices, *groups])} (got {text!r})")
        return tuple(dict.fromkeys(names))

    return parse


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, got {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"positive rates, got {text!r}")
    return rates


def _batch(text: str) -> tuple[int, float]:
    try:
        size, ms = text.split(",")
        out = int(size), float(ms) / 1000
    except ValueError:
        raise argparse.ArgumentTypeError(f"SIZE,MS, got {text!r}") from None
    if out[0] < 1 or out[1] < 0:
        raise argparse.ArgumentTypeError(f"a size >= 1 and a time >= 0, got {text!r}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    config_choices = {**CONFIGS, CEILING: {}}
    p.add_argument("--configs", type=_csv(config_choices), default=DEFAULT_CONFIGS,
                   help=f"comma-separated, from {', '.join(config_choices)} "
                        f"(default {','.join(DEFAULT_CONFIGS)}; the ceiling is always "
                        "measured in closed loop, and swept only when listed)")
    p.add_argument("--scenarios", type=_csv(SCENARIOS, GROUPS), default=DEFAULT_SCENARIOS,
                   help=f"comma-separated, from {', '.join(SCENARIOS)}, or the groups "
                        f"{', '.join(GROUPS)} (default: {','.join(DEFAULT_SCENARIOS)})")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per run (5; sweep: 2 per rate)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of warm-up (1; sweep: 0.5 per rate)")
    p.add_argument("--repetitions", type=int, default=None,
                   help="runs per scenario, or per rate (3; sweep: 1)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    p.add_argument("--burst-size", type=int, default=200)
    p.add_argument("--open-loop", type=_rates, default=(), metavar="RATES",
                   help="also measure each scenario at these fixed arrival rates (req/s)")
    p.add_argument("--sweep", action="store_true",
                   help="latency against offered load: rising fixed rates until saturation")
    p.add_argument("--sweep-rates", type=_rates, default=LADDER, metavar="RATES",
                   help="the rising rates of a sweep (default "
                        f"{','.join(f'{r:g}' for r in LADDER)})")
    p.add_argument("--p99-bound-ms", type=float, default=50.0,
                   help="a sweep stops at the first rate whose p99 exceeds this, or that "
                        "gets errors, in three runs (50)")
    p.add_argument("--refine", type=int, default=3,
                   help="bisections between the last rate that held and the first that "
                        "failed (3)")
    p.add_argument("--min-requests", type=int, default=500,
                   help="a fixed-rate run lasts --duration, or longer to send this many (500)")
    p.add_argument("--open-connections", type=int, default=16,
                   help="connections the fixed-rate generator opens before a run (16)")
    p.add_argument("--max-lateness-ms", type=float, default=1.0,
                   help="a fixed-rate run is invalid when its p99 send lateness exceeds this "
                        "and --max-lateness-share of its p99 latency (1)")
    p.add_argument("--max-lateness-share", type=float, default=0.1,
                   help="see --max-lateness-ms (0.1)")
    p.add_argument("--quick", action="store_true",
                   help="2 s runs, no warm-up, 1 repetition (finishes in under 2 minutes)")
    p.add_argument("--url", help="measure this running gateway instead of starting one")
    p.add_argument("--baseline-url",
                   help="also measure another server (any Open Inference Protocol server, or "
                        "a gateway) on the scenarios whose door it answers")
    p.add_argument("--baseline-model", help="the model's name on the baseline (--model)")
    p.add_argument("--grpc-baseline", metavar="HOST:PORT",
                   help="also measure any Open Inference Protocol gRPC server on the gRPC "
                        "scenarios (with --baseline-url: the same server's REST)")
    p.add_argument("--grpc-address", metavar="HOST:PORT",
                   help="the gRPC service of the --url gateway (its GATEWAY_GRPC_PORT)")
    p.add_argument("--grpc-streams", type=int, default=8,
                   help="gRPC scenarios: concurrent calls per connection (8)")
    p.add_argument("--mlserver", action="store_true",
                   help="start MLServer (its xgboost or lightgbm runtime, adaptive batching "
                        "on) serving the model's own file from --model-root, and measure it "
                        "as the baseline; it is installed once into a virtualenv of its own "
                        "from bench/mlserver.lock")
    p.add_argument("--mlserver-venv", type=Path, default=None,
                   help="MLServer's virtualenv (default: ~/.cache/inference-gateway/"
                        "mlserver-<lock digest>)")
    p.add_argument("--mlserver-batch", type=_batch, default=(64, 0.002),
                   metavar="SIZE,MS",
                   help="MLServer's max_batch_size and max_batch_time in ms (64,2)")
    p.add_argument("--open-loop-at", type=_rates, default=(), metavar="FRACTIONS",
                   help="also measure each scenario at these fractions of the req/s the "
                        "target reached in its closed loop (0.5: half of its capacity)")
    p.add_argument("--v2-input", default="input", help="V2 requests: input tensor name")
    p.add_argument("--v2-datatype", choices=("FP64", "FP32"), default="FP64",
                   help="V2 requests: tensor datatype")
    p.add_argument("--model-root", type=Path, default=Path("models"))
    p.add_argument("--model", default="iris",
                   help="model every request asks (iris; heavy: the 300-tree, 20-feature "
                        "demo; lgbm-heavy, xgb-heavy: the heavy workload's boosters)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers per gateway")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--publish", type=Path, metavar="DIR",
                   help="also copy the report into DIR as bench-report.md, "
                        "bench-throughput.png, bench-latency.png (a sweep: bench-sweep.md, "
                        "bench-sweep.png), with their JSON")
    p.add_argument("--publish-prefix", default="bench-",
                   help="the published files' prefix (bench-; e.g. bench-doors-)")
    return p


def _options(args: argparse.Namespace) -> Options:
    quick, sweep = args.quick, args.sweep
    duration = args.duration if args.duration is not None else (
        2.0 if quick or sweep else 5.0)
    warmup = args.warmup if args.warmup is not None else (
        0.0 if quick else 0.5 if sweep else 1.0)
    reps = args.repetitions if args.repetitions is not None else (1 if quick or sweep else 3)
    return Options(
        configs=args.configs, scenarios=args.scenarios, duration_s=duration, warmup_s=warmup,
        repetitions=reps, connections=args.connections, burst_size=args.burst_size,
        open_loop_rates=args.open_loop, url=args.url, baseline_url=args.baseline_url,
        baseline_model=args.baseline_model, model_root=args.model_root, model=args.model,
        workers=args.workers, v2_input=args.v2_input, v2_datatype=args.v2_datatype,
        sweep=sweep, sweep_rates=args.sweep_rates, p99_bound_ms=args.p99_bound_ms,
        refine=args.refine, open_connections=args.open_connections,
        min_requests=args.min_requests,
        max_lateness_ms=args.max_lateness_ms, max_lateness_share=args.max_lateness_share,
        open_loop_at=args.open_loop_at, mlserver=args.mlserver,
        mlserver_venv=args.mlserver_venv, mlserver_batch=args.mlserver_batch,
        grpc_address=args.grpc_address, grpc_baseline=args.grpc_baseline,
        grpc_streams=args.grpc_streams,
    )


def _version(tool: str, flag: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        return tool
    out = subprocess.run([exe, flag], capture_output=True, text=True, check=False)
    m = re.search(r"\S*?(\d+\.\d+(?:\.\d+)?)", out.stdout + out.stderr)
    return f"{tool} {m.group(1)}" if m else tool


def _meta(opts: Options, bench: Bench, stamp: str, argv: list[str]) -> dict[str, Any]:
    return {
        "timestamp": stamp,
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in argv),
        "duration_s": opts.duration_s, "warmup_s": opts.warmup_s,
        "repetitions": opts.repetitions, "connections": opts.connections,
        "configs": list(opts.configs), "scenarios": list(opts.scenarios),
        "machine": bench.machine, "machine_after": bench.machine_after,
        "wrk_version": _version("wrk", "-v"),
        **({"h2load_version": _version("h2load", "--version")}
           if any(SCENARIOS[s].grpc for s in opts.scenarios) else {}),
        "grpc_streams": opts.grpc_streams,
        "open_loop_generator": {
            "connections": opts.open_connections, "max_connections": 512,
            "min_requests": opts.min_requests,
            "warmup_s": opts.warmup_s, "duration_s": opts.duration_s,
            "repetitions": opts.repetitions, "max_lateness_ms": opts.max_lateness_ms,
            "max_lateness_share": opts.max_lateness_share,
        },
        "p99_bound_ms": opts.p99_bound_ms,
        "skipped": bench.skipped,
        "model": opts.model,
        "model_limit": [lim.to_json() for lim in bench.limits],
        "baseline": _baseline(opts),
    }


def _baseline(opts: Options) -> str | None:
    if opts.mlserver:
        size, wait_s = opts.mlserver_batch
        store = ModelStore(opts.model_root)
        family = store.manifest(opts.model, store.latest(opts.model)).family
        return (f"MLServer 1.7.1 (bench/mlserver.lock) with {RUNTIMES.get(family, family)} "
                f"on the same model file, adaptive batching (max_batch_size {size}, "
                f"max_batch_time {wait_s * 1000:g} ms), one parallel inference worker, the "
                "library's default threads; REST and gRPC")
    return ", ".join(x for x in (opts.baseline_url, opts.grpc_baseline and
                                 f"gRPC {opts.grpc_baseline}") if x) or None


_PUBLISHED = ("report.md", "throughput.png", "latency.png", "sweep.md", "sweep.png")


def publish(run_dir: Path, dest: Path, *, sweep: bool, prefix: str = "bench-") -> list[Path]:
    """Copy a run's report files into ``dest`` with ``prefix`` before their names, links
    rewritten; the JSON goes to ``<prefix>report.json`` or ``<prefix>sweep.json``."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in _PUBLISHED:
        path = run_dir / name
        if not path.exists():
            continue
        if path.suffix == ".md":
            text = path.read_text()
            for old in _PUBLISHED:
                text = text.replace(f"]({old})", f"]({prefix}{old})")
            (dest / f"{prefix}{name}").write_text(text)
        else:
            shutil.copyfile(path, dest / f"{prefix}{name}")
        written.append(dest / f"{prefix}{name}")
    json_path = dest / f"{prefix}{'sweep' if sweep else 'report'}.json"
    shutil.copyfile(run_dir / "results.json", json_path)
    return [*written, json_path]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    opts = _options(args)
    console = Console(width=None if sys.stdout.isatty() else 200)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out / stamp
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)
        bench = run_bench(opts, lambda msg: progress.update(task, description=msg, advance=1))
    meta = _meta(opts, bench, stamp, argv)
    if opts.sweep:
        write_sweep_report(out_dir, bench.sweeps, meta)
        report = out_dir / "sweep.md"
        console.print(report.read_text().split("## Every step", 1)[0])
    else:
        write_report(out_dir, bench.runs, meta, bench.open_runs)
        rows = aggregate(bench.runs, limit_of(meta))
        cols = columns(rows)
        table = Table(title=f"bench {stamp}")
        for col in cols:
            table.add_column(col, justify="left" if col in ("config", "scenario") else "right")
        for r in rows:
            table.add_row(*table_cells(r, cols))
        console.print(table)
        report = out_dir / "report.md"
        text = report.read_text()
        if "## Goals" in text:
            console.print("## Goals" + text.split("## Goals", 1)[1].split("![", 1)[0])
    console.print(f"report: {report} (and results.json, plots beside it)")
    if args.publish is not None:
        for path in publish(out_dir, args.publish, sweep=opts.sweep,
                            prefix=args.publish_prefix):
            console.print(f"published: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
