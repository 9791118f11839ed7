"""``python -m bench``: load-test gateway configurations side by side and write a report.

By default it starts everything itself (a redis-server, one gateway per configuration, the
bare ceiling endpoint) on free loopback ports, and stops it all at the end.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.report import COLUMNS, table_cells, write_report
from bench.runner import Options, run_bench
from bench.scenarios import CONFIGS, DEFAULT_CONFIGS, SCENARIOS


def _csv(choices: Mapping[str, object]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join(choices)} (got {text!r})")
        return names

    return parse


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=_csv(CONFIGS), default=DEFAULT_CONFIGS,
                   help=f"comma-separated, from {', '.join(CONFIGS)} "
                        f"(default {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--scenarios", type=_csv(SCENARIOS), default=tuple(SCENARIOS),
                   help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--duration", type=float, default=None, help="seconds per run (5)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up (1)")
    p.add_argument("--repetitions", type=int, default=None, help="runs per scenario (3)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    p.add_argument("--burst-size", type=int, default=200)
    p.add_argument("--open-loop", type=_rates, default=(), metavar="RATES",
                   help="also measure latency at these fixed arrival rates (req/s), e.g. 100,400")
    p.add_argument("--quick", action="store_true",
                   help="2 s runs, no warm-up, 1 repetition (finishes in under 2 minutes)")
    p.add_argument("--url", help="measure this running gateway instead of starting one")
    p.add_argument("--baseline-url",
                   help="also measure another server answering the same GET /predict")
    p.add_argument("--model-root", type=Path, default=Path("models"))
    p.add_argument("--model", default="iris",
                   help="model every request asks (iris; heavy: the 300-tree, 20-feature demo)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers per gateway")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quick = args.quick
    opts = Options(
        configs=args.configs,
        scenarios=args.scenarios,
        duration_s=args.duration if args.duration is not None else (2.0 if quick else 5.0),
        warmup_s=args.warmup if args.warmup is not None else (0.0 if quick else 1.0),
        repetitions=args.repetitions if args.repetitions is not None else (1 if quick else 3),
        connections=args.connections,
        burst_size=args.burst_size,
        open_loop_rates=args.open_loop,
        url=args.url,
        baseline_url=args.baseline_url,
        model_root=args.model_root,
        model=args.model,
        workers=args.workers,
    )
    console = Console(width=None if sys.stdout.isatty() else 200)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out / stamp
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)
        bench = run_bench(opts, lambda msg: progress.update(task, description=msg, advance=1))
    meta = {
        "timestamp": stamp,
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "duration_s": opts.duration_s, "warmup_s": opts.warmup_s,
        "repetitions": opts.repetitions, "connections": opts.connections,
        "configs": list(opts.configs), "scenarios": list(opts.scenarios),
        "open_loop": bench.open_loop,
    }
    rows = write_report(out_dir, bench.runs, meta)
    table = Table(title=f"bench {stamp}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("config", "scenario") else "right")
    for r in rows:
        table.add_row(*table_cells(r))
    console.print(table)
    console.print((out_dir / "report.md").read_text().split("## Goals", 1)[-1]
                  if "## Goals" in (out_dir / "report.md").read_text() else "")
    console.print(f"report: {out_dir}/report.md, results.json, throughput.png, latency_cdf.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
