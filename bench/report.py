"""Aggregate runs into rows (median of repetitions, with min and max), acceptance checks,
and the report files: JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.runner import CEILING, Run

__all__ = ["Check", "Row", "aggregate", "checks", "to_markdown", "write_report"]


@dataclass(frozen=True)
class Row:
    config: str
    scenario: str
    reps: int
    rps: float  # median over repetitions
    rps_min: float
    rps_max: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    errors: int  # over all repetitions
    model_calls: float | None  # median per repetition
    rows_per_call: float | None
    hit_ratio: float | None
    vs_naive: float | None = None
    vs_ceiling: float | None = None


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def _ms(runs: Sequence[Run], p: float) -> float | None:
    values = [r.latency_us[p] for r in runs if p in r.latency_us]
    return _median(values) / 1000 if values else None


def aggregate(runs: Sequence[Run]) -> list[Row]:
    """One row per (config, scenario), in first-seen order, with ratios to ``naive`` (same
    scenario) and to the ceiling (the bare endpoint under the hot load)."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.config, r.scenario)].append(r)
    rows: dict[tuple[str, str], Row] = {}
    for (config, scenario), rs in groups.items():
        counted = [r.counters for r in rs if r.counters is not None]
        calls = _median(c.model_calls for c in counted) if counted else None
        total_calls = sum(c.model_calls for c in counted)
        total_rows = sum(c.model_rows for c in counted)
        lookups = sum(c.lookups for c in counted)
        rows[(config, scenario)] = Row(
            config=config, scenario=scenario, reps=len(rs),
            rps=_median(r.rps for r in rs), rps_min=min(r.rps for r in rs),
            rps_max=max(r.rps for r in rs),
            p50_ms=_ms(rs, 50.0), p90_ms=_ms(rs, 90.0), p99_ms=_ms(rs, 99.0),
            errors=sum(r.errors for r in rs),
            model_calls=calls,
            rows_per_call=(total_rows / total_calls) if total_calls else None,
            hit_ratio=(sum(c.hits for c in counted) / lookups) if lookups else None,
        )
    ceiling = rows.get((CEILING, "hot"))
    out = []
    for (_config, scenario), row in rows.items():
        naive = rows.get(("naive", scenario))
        out.append(Row(**{
            **asdict(row),
            "vs_naive": row.rps / naive.rps if naive and naive.rps else None,
            "vs_ceiling": row.rps / ceiling.rps if ceiling and ceiling.rps else None,
        }))
    return out


@dataclass(frozen=True)
class Check:
    name: str
    target: str
    measured: str
    passed: bool | None  # None: not measured in this run


def checks(rows: Sequence[Row]) -> list[Check]:
    """The gateway's standing performance goals, judged on this run."""
    by = {(r.config, r.scenario): r for r in rows}
    out = []

    def pair(scenario: str) -> tuple[Row | None, Row | None]:
        return by.get(("full", scenario)), by.get(("naive", scenario))

    full, naive = pair("unique")
    if full and naive and naive.rps:
        ratio = full.rps / naive.rps
        out.append(Check("unique: full vs naive throughput", ">= 10x", f"{ratio:.1f}x",
                         ratio >= 10))
        if full.p99_ms is not None and naive.p99_ms is not None:
            out.append(Check("unique: full p99 below naive p99", "<",
                             f"{full.p99_ms:.2f} ms vs {naive.p99_ms:.2f} ms",
                             full.p99_ms < naive.p99_ms))
    full, naive = pair("lowload")
    if full and naive and full.p50_ms is not None and naive.p50_ms:
        rel = full.p50_ms / naive.p50_ms - 1
        out.append(Check("lowload: full p50 within 10% of naive", "<= +10%",
                         f"{full.p50_ms:.3f} ms vs {naive.p50_ms:.3f} ms ({rel:+.1%})",
                         rel <= 0.10))
    hot = by.get(("full", "hot"))
    if hot and hot.vs_ceiling is not None:
        out.append(Check("hot: full vs bare-endpoint ceiling", ">= 0.5x",
                         f"{hot.vs_ceiling:.2f}x", hot.vs_ceiling >= 0.5))
    b = by.get(("full", "burst"))
    if b and b.model_calls is not None:
        out.append(Check("burst: model calls for N identical new rows", "== 1",
                         f"{b.model_calls:g}", b.model_calls == 1))
    comp, full = by.get(("compiled", "unique")), by.get(("full", "unique"))
    if comp and full and full.rps:
        ratio = comp.rps / full.rps
        out.append(Check("unique: compiled vs sklearn backend (both full)", ">= 3x",
                         f"{ratio:.1f}x", ratio >= 3))
    comp, full = by.get(("compiled", "lowload")), by.get(("full", "lowload"))
    if comp and full and comp.p50_ms is not None and full.p50_ms:
        ratio = comp.p50_ms / full.p50_ms
        out.append(Check("lowload: compiled p50 vs sklearn p50", "<= 0.5x",
                         f"{comp.p50_ms:.3f} ms vs {full.p50_ms:.3f} ms ({ratio:.2f}x)",
                         ratio <= 0.5))
    down = by.get(("full", "redis-down"))
    if down:
        out.append(Check("redis-down: errors while Redis is killed", "== 0",
                         str(down.errors), down.errors == 0))
    return out


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


COLUMNS = ("config", "scenario", "req/s (min-max)", "p50 ms", "p90 ms", "p99 ms", "errors",
           "model calls", "rows/call", "hit ratio", "x naive", "x ceiling")


def table_cells(r: Row) -> list[str]:
    return [
        r.config, r.scenario,
        f"{r.rps:,.0f} ({r.rps_min:,.0f}..{r.rps_max:,.0f})",
        _f(r.p50_ms, ".2f"), _f(r.p90_ms, ".2f"), _f(r.p99_ms, ".2f"), str(r.errors),
        _f(r.model_calls, ",.0f"), _f(r.rows_per_call, ".1f"), _f(r.hit_ratio, ".3f"),
        _f(r.vs_naive, ".2f"), _f(r.vs_ceiling, ".2f"),
    ]


def to_markdown(rows: Sequence[Row], check_list: Sequence[Check], meta: dict[str, Any]) -> str:
    lines = [f"# Bench report {meta['timestamp']}", "", f"Command: `{meta['command']}`", "",
             f"Duration {meta['duration_s']} s, warm-up {meta['warmup_s']} s, "
             f"{meta['repetitions']} repetition(s), {meta['connections']} connections; "
             "median of repetitions (min-max for req/s).", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    if check_list:
        lines += ["", "## Goals", "", "| goal | target | measured | |", "|---|---|---|---|"]
        for c in check_list:
            verdict = "n/a" if c.passed is None else ("met" if c.passed else "**short**")
            lines.append(f"| {c.name} | {c.target} | {c.measured} | {verdict} |")
    if meta.get("open_loop"):
        lines += ["", "## Open loop (unique rows at a fixed arrival rate)", "",
                  "| config | rate/s | sent | errors | p50 ms | p99 ms |",
                  "|---|---|---|---|---|---|"]
        for o in meta["open_loop"]:
            lat = o["latency_us"]
            lines.append(f"| {o['config']} | {o['rate']:g} | {o['sent']} | {o['errors']} | "
                         f"{lat['50']/1000:.2f} | {lat['99']/1000:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, runs: Sequence[Run], meta: dict[str, Any]) -> list[Row]:
    """Write results.json, report.md, throughput.png, latency_cdf.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(runs)
    check_list = checks(rows)
    (out_dir / "results.json").write_text(json.dumps({
        "meta": meta,
        "rows": [asdict(r) for r in rows],
        "checks": [asdict(c) for c in check_list],
        "runs": [r.to_json() for r in runs],
    }, indent=2) + "\n")
    (out_dir / "report.md").write_text(to_markdown(rows, check_list, meta))
    _plots(out_dir, rows, runs)
    return rows


def _plots(out_dir: Path, rows: Sequence[Row], runs: Sequence[Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in dict.fromkeys(r.scenario for r in rows) if s != "burst"]
    configs = list(dict.fromkeys(r.config for r in rows))
    by = {(r.config, r.scenario): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(scenarios)), 4.5))
    width = 0.8 / max(1, len(configs))
    for i, config in enumerate(configs):
        xs, ys, lo, hi = [], [], [], []
        for j, sc in enumerate(scenarios):
            r = by.get((config, sc))
            if r is None:
                continue
            xs.append(j + i * width)
            ys.append(r.rps)
            lo.append(r.rps - r.rps_min)
            hi.append(r.rps_max - r.rps)
        ax.bar(xs, ys, width, yerr=[lo, hi], label=config, capsize=2)
    ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(scenarios))],
                  scenarios)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (median, min-max)")
    ax.set_title("Throughput per configuration and scenario")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=110)
    plt.close(fig)

    wrk_scenarios = [s for s in scenarios if any(r.latency_us for r in runs if r.scenario == s)]
    fig, axes = plt.subplots(1, max(1, len(wrk_scenarios)),
                             figsize=(4 * max(1, len(wrk_scenarios)), 3.8), squeeze=False)
    for ax, sc in zip(axes[0], wrk_scenarios, strict=False):
        for config in configs:
            rs = [r for r in runs if r.config == config and r.scenario == sc and r.latency_us]
            if not rs:
                continue
            ps = sorted(rs[0].latency_us)
            xs = [_median(r.latency_us[p] for r in rs) / 1000 for p in ps]
            ax.plot(xs, ps, label=config)
        ax.set_xscale("log")
        ax.set_xlabel("latency ms")
        ax.set_ylabel("percentile")
        ax.set_title(sc)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Latency CDF per configuration")
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=110)
    plt.close(fig)
