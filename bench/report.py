"""Aggregate runs into rows (median of repetitions, with min and max), acceptance checks,
and the report files: JSON, Markdown and PNG plots.

Every table puts ratios first (to the bare ceiling endpoint, to ``naive``, to the baseline)
and absolute figures second; every figure is a median over the repetitions, with its
minimum and maximum. When the run measured the model's own limit (``bench.limit``, in
``meta["model_limit"]``), it heads the report, and every throughput stands beside it as rows/s
over the limit's rows/s, every latency at a fixed rate as a multiple of its 64-row call.

A run recorded as invalid (a gRPC run with an error: ``Run.invalid``) is no throughput: the
figures of a row come from its valid repetitions only, and a row with none shows why instead.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.limit import Limit
from bench.machine import summary
from bench.runner import CEILING, OpenRun, Run
from bench.sweep import Step, Sweep

__all__ = ["Check", "OpenRow", "Row", "aggregate", "aggregate_open", "checks", "columns",
           "grpc_checks", "heavy_checks", "limit_of", "open_markdown", "ratio_tables",
           "sweep_markdown", "table_cells", "to_markdown", "write_report", "write_sweep_report"]


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
    # Ratios of req/s medians; their spread is this row's min and max over the reference's
    # median.
    vs_naive: float | None = None
    vs_ceiling: float | None = None
    vs_baseline: float | None = None
    vs_naive_spread: tuple[float, float] | None = None
    vs_ceiling_spread: tuple[float, float] | None = None
    vs_baseline_spread: tuple[float, float] | None = None
    p50_min: float | None = None
    p50_max: float | None = None
    p99_min: float | None = None
    p99_max: float | None = None
    generator_cores: float | None = None  # median CPU seconds of wrk per second
    server_cores: float | None = None  # median CPU seconds of the server per second
    threads: int = 0
    connections: int = 0
    rows_per_request: int = 1
    vs_limit: float | None = None  # rows/s over the model's own limit (its median)
    vs_limit_spread: tuple[float, float] | None = None
    invalid: int = 0  # repetitions left out: not a throughput (see Run.invalid)
    why_invalid: str | None = None  # the first one's reason
    generator: str = "wrk"
    streams: int = 1
    lateness_p99_ms: float | None = None  # the worst valid repetition's (grpc_load)

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.rows_per_request


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def _ms(runs: Sequence[Run], p: float) -> tuple[float | None, float | None, float | None]:
    values = [r.latency_us[p] / 1000 for r in runs if p in r.latency_us]
    if not values:
        return None, None, None
    return _median(values), min(values), max(values)


def _cores(pairs: Iterable[tuple[float | None, float]]) -> float | None:
    shares = [cpu / s for cpu, s in pairs if cpu is not None and s]
    return _median(shares) if shares else None


def aggregate(runs: Sequence[Run], limit: Limit | None = None) -> list[Row]:
    """One row per (config, scenario), in first-seen order, with ratios to ``naive`` and to
    ``baseline`` (same scenario), to the ceiling (the bare endpoint under the hot load) and,
    given the model's own ``limit``, rows/s over its rows/s (not for the ceiling, which runs
    no model, nor for a burst)."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.config, r.scenario)].append(r)
    rows: dict[tuple[str, str], Row] = {}
    for (config, scenario), every in groups.items():
        left_out = [r for r in every if r.invalid is not None]
        rs = [r for r in every if r.invalid is None]
        if not rs:
            rows[(config, scenario)] = _invalid_row(every)
            continue
        counted = [r.counters for r in rs if r.counters is not None]
        calls = _median(c.model_calls for c in counted) if counted else None
        total_calls = sum(c.model_calls for c in counted)
        total_rows = sum(c.model_rows for c in counted)
        lookups = sum(c.lookups for c in counted)
        p50, p50_min, p50_max = _ms(rs, 50.0)
        p99, p99_min, p99_max = _ms(rs, 99.0)
        rows[(config, scenario)] = Row(
            config=config, scenario=scenario, reps=len(rs),
            rps=_median(r.rps for r in rs), rps_min=min(r.rps for r in rs),
            rps_max=max(r.rps for r in rs),
            p50_ms=p50, p90_ms=_ms(rs, 90.0)[0], p99_ms=p99,
            p50_min=p50_min, p50_max=p50_max, p99_min=p99_min, p99_max=p99_max,
            errors=sum(r.errors for r in rs),
            model_calls=calls,
            rows_per_call=(total_rows / total_calls) if total_calls else None,
            hit_ratio=(sum(c.hits for c in counted) / lookups) if lookups else None,
            generator_cores=_cores((r.generator_cpu_s, r.seconds) for r in rs),
            server_cores=_cores((r.server_cpu_s, r.seconds) for r in rs),
            threads=rs[0].threads, connections=rs[0].connections,
            rows_per_request=rs[0].rows, invalid=len(left_out),
            why_invalid=left_out[0].invalid if left_out else None,
            generator=rs[0].generator, streams=rs[0].streams,
            lateness_p99_ms=max((r.lateness_p99_us / 1000 for r in rs
                                 if r.lateness_p99_us is not None), default=None),
        )
    ceiling = rows.get((CEILING, "hot"))
    out = []
    for (config, scenario), row in rows.items():
        naive = rows.get(("naive", scenario))
        base = rows.get(("baseline", scenario))
        if config in (CEILING, "baseline"):  # references, not compared with the others
            naive = None
            base = None
        top = None if scenario == "burst" else ceiling  # a burst is not a throughput
        out.append(Row(**{
            **asdict(row),
            **_ratio("vs_naive", row, naive),
            **_ratio("vs_ceiling", row, top),
            **_ratio("vs_baseline", row, base),
            **_vs_limit(row, None if config == CEILING or scenario == "burst" else limit),
        }))
    return out


def _invalid_row(runs: Sequence[Run]) -> Row:
    """A row of runs none of which is a throughput: no figures, the first reason."""
    r = runs[0]
    return Row(config=r.config, scenario=r.scenario, reps=len(runs), rps=0.0, rps_min=0.0,
               rps_max=0.0, p50_ms=None, p90_ms=None, p99_ms=None,
               errors=sum(x.errors for x in runs), model_calls=None, rows_per_call=None,
               hit_ratio=None, threads=r.threads, connections=r.connections,
               rows_per_request=r.rows, invalid=len(runs), why_invalid=r.invalid,
               generator=r.generator, streams=r.streams)


def _vs_limit(row: Row, limit: Limit | None) -> dict[str, Any]:
    if limit is None or not row.rps:
        return {}
    per = row.rows_per_request
    return {"vs_limit": row.rps * per / limit.rows_per_s,
            "vs_limit_spread": (row.rps_min * per / limit.rows_per_s,
                                row.rps_max * per / limit.rows_per_s)}


def limit_of(meta: dict[str, Any]) -> Limit | None:
    """The model's own limit a run measured, if any: the faster of its measurements before
    the servers started and after they stopped (on a shared machine they differ; every ratio
    to the limit is then judged against the stricter)."""
    limits = [Limit.from_json(x) for x in meta.get("model_limit") or []]
    return max(limits, key=lambda x: x.rows_per_s) if limits else None


def _ratio(name: str, row: Row, ref: Row | None) -> dict[str, Any]:
    if ref is None or not ref.rps or not row.rps:
        return {name: None, f"{name}_spread": None}
    return {name: row.rps / ref.rps,
            f"{name}_spread": (row.rps_min / ref.rps, row.rps_max / ref.rps)}


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


def grpc_checks(rows: Sequence[Row], config: str) -> list[Check]:
    """The gRPC door's goals for the gateway configuration ``config``: the hot row at least
    10x the baseline's gRPC and 0.3x the gateway's own REST ``GET /predict`` hot row; one new
    row per call at least 10x the baseline's. A goal whose rows are missing or invalid is not
    judged."""
    by = {(r.config, r.scenario): r for r in rows if r.rps}
    out = []
    for scenario, ref_key, target in (("grpc-hot", ("baseline", "grpc-hot"), 10.0),
                                      ("grpc-hot", (config, "hot"), 0.3),
                                      ("grpc-unique", ("baseline", "grpc-unique"), 10.0)):
        ours, ref = by.get((config, scenario)), by.get(ref_key)
        if ours is None or ref is None:
            continue
        ratio = ours.rps / ref.rps
        what = ("the baseline's gRPC" if ref_key[0] == "baseline"
                else "its own REST GET /predict hot")
        out.append(Check(f"{scenario}: {config} vs {what}", f">= {target:g}x",
                         f"{ratio:.2f}x ({ours.rps:,.0f} vs {ref.rps:,.0f} req/s; "
                         f"{ours.rps_min / ref.rps:.2f}..{ours.rps_max / ref.rps:.2f})",
                         ratio >= target))
    return out


def heavy_checks(rows: Sequence[Row], open_rows: Sequence[OpenRow], limit: Limit | None,
                 config: str = "compiled") -> list[Check]:
    """The heavy workload's goals (docs/performance.md), judged on this run for the gateway
    configuration ``config`` (the gateway's defaults: every mechanism on, the store's chosen
    backend) against the baseline and the model's own ``limit``."""
    by = {(r.config, r.scenario): r for r in rows}
    out = []
    one, base = by.get((config, "v2-json-unique")), by.get(("baseline", "v2-json-unique"))
    if one and base and base.rps:
        ratio = one.rows_per_s / base.rows_per_s
        out.append(Check("v2-json-unique: gateway rows/s vs the baseline's", ">= 5x",
                         f"{ratio:.2f}x ({one.rows_per_s:,.0f} vs {base.rows_per_s:,.0f})",
                         ratio >= 5))
    if one and one.p99_ms is not None:
        out.append(Check("v2-json-unique: gateway p99 (closed loop)", "<= 20 ms",
                         f"{one.p99_ms:.1f} ms", one.p99_ms <= 20))
    if limit is not None:
        for scenario in ("v2-json-32-unique", "multirow"):
            r = by.get((config, scenario))
            if r and r.vs_limit is not None:
                out.append(Check(f"{scenario}: gateway rows/s vs the model's own limit",
                                 ">= 0.6x", f"{r.vs_limit:.2f}x ({r.rows_per_s:,.0f} vs "
                                 f"{limit.rows_per_s:,.0f})", r.vs_limit >= 0.6))
    b = by.get((config, "burst"))
    if b and b.model_calls is not None:
        out.append(Check("burst: model calls for N identical new rows", "== 1",
                         f"{b.model_calls:g}", b.model_calls == 1))
    if limit is not None:
        for o in open_rows:
            closed = by.get((o.config, o.scenario))
            if o.config != config or closed is None or not closed.rps:
                continue
            share = o.rate / closed.rps
            if not 0.4 <= share <= 0.6:
                continue
            bound = 5 * limit.call_us / 1000
            out.append(Check(f"{o.scenario}: p99 at {share:.0%} of capacity "
                             f"({o.rate:,.0f}/s) vs 5x the 64-row call",
                             f"<= {bound:.1f} ms",
                             _bounded(o.valid, f"{o.p99_ms:.1f} ms"), o.p99_ms <= bound))
    return out


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _spread(v: float | None, lo: float | None, hi: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    if lo is None or hi is None or lo == hi:
        return format(v, fmt)
    return f"{format(v, fmt)} ({format(lo, fmt)}..{format(hi, fmt)})"


def _ratio_cell(r: Row, name: str) -> str:
    value: float | None = getattr(r, name)
    spread: tuple[float, float] | None = getattr(r, f"{name}_spread")
    fmt = ".2f" if value is None or value < 10 else ".1f"
    lo, hi = spread if spread is not None else (None, None)
    return _spread(value, lo, hi, fmt)


_RATIOS = (
    ("vs_ceiling", "x ceiling", "req/s over the bare endpoint's under the hot load, same wrk "
     "settings"),
    ("vs_naive", "x naive", "req/s over naive's in the same scenario"),
    ("vs_baseline", "x baseline", "req/s over the baseline server's in the same scenario"),
    ("vs_limit", "x model limit", "rows/s over the model's own limit (its served backend "
     "in-process on 64-row calls, same threads)"),
)


def ratio_tables(rows: Sequence[Row]) -> list[str]:
    """One table per ratio measured: scenarios down, configurations across; each cell the
    ratio of medians, with the row's min and max over the reference's median."""
    lines: list[str] = []
    scenarios = [s for s in dict.fromkeys(r.scenario for r in rows) if s != "burst"]
    by = {(r.config, r.scenario): r for r in rows}
    for name, title, meaning in _RATIOS:
        configs = list(dict.fromkeys(r.config for r in rows if getattr(r, name) is not None))
        if not configs:
            continue
        lines += [f"{title}: {meaning}.", ""]
        lines += _table(("scenario", *configs), (
            [sc, *(_ratio_cell(by[(c, sc)], name) if (c, sc) in by else "-"
                   for c in configs)]
            for sc in scenarios if any(getattr(by.get((c, sc)), name, None) is not None
                                       for c in configs)))
        lines.append("")
    return lines


def columns(rows: Sequence[Row]) -> tuple[str, ...]:
    """The table's columns: ratios first (x baseline only when a baseline was measured, x
    model limit and rows/s only when the model's own limit was)."""
    cols = ["config", "scenario", "x ceiling", "x naive"]
    if any(r.vs_baseline is not None for r in rows):
        cols.append("x baseline")
    limit = any(r.vs_limit is not None for r in rows)
    if limit:
        cols.append("x model limit")
    cols.append("req/s (min-max)")
    if limit:
        cols.append("rows/s")
    many = len({r.generator for r in rows}) > 1
    return (*cols, "p50 ms (min-max)", "p99 ms (min-max)", "errors",
            *(("generator",) if many else ()),
            "generator CPU", "server CPU", "model calls", "rows/call", "hit ratio")


def table_cells(r: Row, cols: Sequence[str]) -> list[str]:
    cells = {
        "config": r.config, "scenario": r.scenario,
        "x ceiling": _ratio_cell(r, "vs_ceiling"), "x naive": _ratio_cell(r, "vs_naive"),
        "x baseline": _ratio_cell(r, "vs_baseline"),
        "x model limit": _ratio_cell(r, "vs_limit"),
        "req/s (min-max)": (_spread(r.rps, r.rps_min, r.rps_max, ",.0f") if r.rps
                            else f"invalid: {r.why_invalid}"),
        "rows/s": _f(r.rows_per_s, ",.0f"),
        "p50 ms (min-max)": _spread(r.p50_ms, r.p50_min, r.p50_max, ".2f"),
        "p99 ms (min-max)": _spread(r.p99_ms, r.p99_min, r.p99_max, ".2f"),
        "errors": str(r.errors) + (f" ({r.invalid} invalid)" if r.invalid else ""),
        "generator CPU": _f(r.generator_cores, ".2f"), "server CPU": _f(r.server_cores, ".2f"),
        "generator": r.generator + (f" x{r.streams}" if r.streams > 1 else "")
        + ("" if r.lateness_p99_ms is None else f", late p99 {r.lateness_p99_ms:.2f} ms"),
        "model calls": _f(r.model_calls, ",.0f"), "rows/call": _f(r.rows_per_call, ".1f"),
        "hit ratio": _f(r.hit_ratio, ".3f"),
    }
    return [cells[c] for c in cols]


def _table(cols: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return out


def _header(title: str, meta: dict[str, Any]) -> list[str]:
    machine = meta.get("machine") or {}
    after = (meta.get("machine_after") or {}).get("load_average") or []
    lines = [f"# {title} {meta['timestamp']}", "", f"Command: `{meta['command']}`", ""]
    if machine:
        lines += [f"Machine: {summary(machine)}"
                  + (f", {after[0]:g} at the end" if after else "")
                  + "; other processes may share it, so figures are indicative. Python "
                  f"{machine.get('python', '?')}, {machine.get('os', '?')}.", ""]
    limits = [Limit.from_json(x) for x in meta.get("model_limit") or []]
    if limits:
        lines += ["**The model's own limit** (its served backend called in-process on "
                  f"{limits[0].rows}-row blocks of the bench's rows, no HTTP; median of "
                  f"{limits[0].repeats} rounds of {limits[0].calls} calls, min..max): "
                  + limits[0].sentence() + "."
                  + ("" if len(limits) < 2 else
                     f" Measured again after the servers stopped: {limits[1].rows_per_s:,.0f}"
                     f" rows/s, {limits[1].call_us / 1000:.2f} ms a call. Ratios to the limit"
                     " and multiples of its call are taken against the faster of the two."),
                  ""]
    if meta.get("baseline"):
        lines += [f"Baseline: {meta['baseline']}.", ""]
    return lines


@dataclass(frozen=True)
class OpenRow:
    """Fixed-rate runs of one (config, scenario, rate): latency medians with min and max
    over the valid repetitions only; when none was valid, over all of them, as the upper
    bounds they are (``valid == 0``)."""

    config: str
    scenario: str
    rate: float
    reps: int
    valid: int  # repetitions in which the generator kept its schedule
    p50_ms: float
    p50_min: float
    p50_max: float
    p99_ms: float
    p99_min: float
    p99_max: float
    bad: int  # requests without a 2xx answer, over all repetitions
    lateness_p99_ms: float  # the worst repetition's
    generator_cpu: float  # median share of one core
    server_cores: float | None


def aggregate_open(runs: Sequence[OpenRun]) -> list[OpenRow]:
    groups: dict[tuple[str, str, float], list[OpenRun]] = defaultdict(list)
    for r in runs:
        groups[(r.config, r.scenario, r.result.rate)].append(r)
    out = []
    for (config, scenario, rate), rs in groups.items():
        valid = [r for r in rs if r.result.valid]  # a late run measured the generator too
        used = valid or rs
        p50 = [r.result.latency_us[50.0] / 1000 for r in used]
        p99 = [r.result.latency_us[99.0] / 1000 for r in used]
        out.append(OpenRow(
            config, scenario, rate, len(rs), len(valid), *_stats(p50), *_stats(p99),
            sum(r.result.bad for r in rs),
            max(r.result.lateness_us[99.0] for r in rs) / 1000,
            _median(r.result.cpu_share for r in rs),
            _cores((r.server_cpu_s, r.result.wall_s) for r in rs)))
    return out


def _stats(values: list[float]) -> tuple[float, float, float]:
    return _median(values), min(values), max(values)


def open_markdown(rows: Sequence[OpenRow], meta: dict[str, Any]) -> list[str]:
    """The open-loop section: latency at fixed arrival rates, invalid runs marked; with the
    model's own limit, each p99 as a multiple of its 64-row call."""
    limit = limit_of(meta)
    gen = meta.get("open_loop_generator", {})
    lines = ["## Open loop (fixed arrival rate)", "",
             _generator_sentence(gen), "",
             "Valid: repetitions whose p99 send lateness stayed within the bound; latencies "
             "are over those only. When none was, the latencies are upper bounds of the "
             "server's (`<=`): the generator's lateness is in them.", ""]
    cols = ("config", "scenario", "rate/s", "valid", "p50 ms (min-max)", "p99 ms (min-max)",
            *(("p99 / model call",) if limit else ()),
            "not 2xx", "lateness p99 ms", "generator CPU", "server CPU")
    lines += _table(cols, ([
        r.config, r.scenario, f"{r.rate:,.0f}", f"{r.valid}/{r.reps}",
        _bounded(r.valid, _spread(r.p50_ms, r.p50_min, r.p50_max, ".2f")),
        _bounded(r.valid, _spread(r.p99_ms, r.p99_min, r.p99_max, ".2f")),
        *((f"{r.p99_ms * 1000 / limit.call_us:.1f}x",) if limit else ()), str(r.bad),
        f"{r.lateness_p99_ms:.2f}", f"{r.generator_cpu:.0%}", _f(r.server_cores, ".2f"),
    ] for r in rows))
    return lines


def _generator_sentence(gen: dict[str, Any]) -> str:
    if not gen:
        return ""
    return (f"Generator: `bench.loadgen`, one process on uvloop, {gen['connections']} "
            f"keep-alive connections opened first (more while all are busy, up to "
            f"{gen['max_connections']}); latency from each request's due time; "
            f"{gen['warmup_s']:g} s warm-up then {gen['duration_s']:g} s measured per run "
            f"(longer at low rates, to measure at least {gen.get('min_requests', 0):,} "
            "requests), "
            f"{gen['repetitions']} repetition(s); a run is invalid when its p99 send "
            f"lateness exceeds {gen['max_lateness_ms']:g} ms and "
            f"{gen.get('max_lateness_share', 0.1):.0%} of its p99 latency (the generator's "
            "part of that p99 could then be more than that). Generator CPU is its CPU "
            "time over the measured window (100% = one core).")


def to_markdown(rows: Sequence[Row], check_list: Sequence[Check], meta: dict[str, Any],
                open_rows: Sequence[OpenRow] = (), images: dict[str, str] | None = None
                ) -> str:
    lines = _header("Bench report", meta)
    threads = sorted({(r.threads, r.connections) for r in rows if r.threads})
    settings = ", ".join(f"-t{t} -c{c}" for t, c in threads) or "-"
    lines += [f"Closed loop: {meta.get('wrk_version', 'wrk')} {settings}, "
              f"{meta['duration_s']:g} s runs after {meta['warmup_s']:g} s warm-up, "
              f"{meta['repetitions']} repetition(s): medians, with min-max over the "
              "repetitions. x ceiling: req/s over the bare endpoint's under the hot load "
              "(same wrk settings); x naive, x baseline: over that target's req/s in the "
              "same scenario. Generator CPU and server CPU: CPU seconds per second of run "
              "(1.00 = one core busy; the machine has "
              f"{(meta.get('machine') or {}).get('cores', '?')}).", ""]
    if any(r.generator != "wrk" for r in rows):
        lines += [_grpc_sentence(meta, rows), ""]
    ratios = ratio_tables(rows)
    if ratios:
        lines += ["## Ratios", "", *ratios]
    lines += ["## Figures", ""]
    cols = columns(rows)
    lines += _table(cols, (table_cells(r, cols) for r in rows))
    if check_list:
        lines += ["", "## Goals", ""]
        lines += _table(("goal", "target", "measured", ""), ([
            c.name, c.target, c.measured,
            "n/a" if c.passed is None else ("met" if c.passed else "**short**")]
            for c in check_list))
    if open_rows:
        lines += ["", *open_markdown(open_rows, meta)]
    if meta.get("skipped"):
        lines += ["", "Not measured: " + "; ".join(meta["skipped"]) + "."]
    if images:
        lines += [""] + [f"![{k}]({v})" for k, v in images.items()]
    return "\n".join(lines) + "\n"


def _grpc_sentence(meta: dict[str, Any], rows: Sequence[Row]) -> str:
    conns = max((r.connections for r in rows if r.generator != "wrk"), default=0)
    return (f"gRPC (ModelInfer, raw FP64 tensors): {conns} connections x "
            f"{meta.get('grpc_streams', '?')} streams; the hot row from "
            f"{meta.get('h2load_version', 'h2load')} (one thread, a fixed number of requests "
            "per run, sized from its warm-up), new rows from bench.grpc_load (grpc.aio, one "
            "process; late p99: how late its event loop woke, the run invalid past max(1 ms, "
            "10% of its p99 latency)). A run is invalid, and left out of the figures, when any "
            "call failed: h2load's requests not all done with HTTP 2xx and an answer's worth "
            "of DATA each, grpc_load's calls not all OK or a sampled answer malformed, or the "
            "gateway's gateway_grpc_requests_total{method=\"ModelInfer\"} counting another "
            "code or fewer OK calls than the generator saw answered.")


def _bounded(valid: bool | int, text: str) -> str:
    """A latency figure; from a late generator only as the upper bound it is."""
    return text if valid else f"<= {text}"


def _step_ms(st: Step, p: float) -> str:
    value = st.p50_ms if p == 50.0 else st.p99_ms
    return _bounded(st.valid, _spread(value, *st.spread_ms(p), ".2f"))


def _capacity(s: Sweep) -> str:
    """The knee's rate; without one, below the first rate that failed (if any did)."""
    if s.knee is not None:
        return f"{s.knee.rate:,.0f}"
    failed = s.first_failed
    return f"< {failed.rate:,.0f}" if failed is not None else "-"


def sweep_markdown(sweeps: Sequence[Sweep], meta: dict[str, Any],
                   images: dict[str, str] | None = None) -> str:
    """Capacity at the p99 bound per target and scenario, then every step."""
    lines = _header("Bench sweep", meta)
    gen = meta.get("open_loop_generator", {})
    bound = sweeps[0].bound_ms if sweeps else meta.get("p99_bound_ms", 50.0)
    lines += [_generator_sentence(gen), "",
              f"Each target gets rising fixed rates until a rate fails (median p99 above "
              f"{bound:g} ms, or a request without a 2xx answer, measured by a generator "
              "that kept its schedule); a rate that fails while its p50 is within the bound "
              "gets two more runs and is judged on all three, so one stall in one run is "
              "not taken for saturation. Then the rates between the last that held and the "
              "first that failed are bisected. Latency measured by a late generator is the "
              "server's plus that lateness: it is shown as an upper bound (`<=`), and still "
              f"shows that a rate held when it is under {bound:g} ms; past it, the run is "
              "repeated, and a rate that stays so is not judged. Capacity: the highest rate "
              f"that held, with p99 under {bound:g} ms, below the first that failed.", ""]
    knees = {(s.config, s.scenario): s.knee for s in sweeps}
    cols = ("config", "scenario", "x naive", "x ceiling",
            f"capacity req/s (p99 < {bound:g} ms)", "p50 ms there (min-max)",
            "p99 ms there (min-max)", "generator CPU there", "server CPU there", "stopped")
    table = []
    for s in sweeps:
        k = s.knee
        naive, ceiling = knees.get(("naive", s.scenario)), knees.get((CEILING, s.scenario))
        table.append([
            s.config, s.scenario,
            _f(k.rate / naive.rate if k and naive else None, ".1f"),
            _f(k.rate / ceiling.rate if k and ceiling else None, ".2f"),
            _capacity(s),
            _step_ms(k, 50.0) if k else "-", _step_ms(k, 99.0) if k else "-",
            f"{k.generator_cpu:.0%}" if k else "-",
            _f(k.server_cpu if k else None, ".2f"), s.stop])
    lines += _table(cols, table)
    lines += ["", "## Every step", ""]
    step_cols = ("config", "scenario", "rate/s", "holds", "runs", "p50 ms (min-max)",
                 "p99 ms (min-max)", "not 2xx", "lateness p99 ms", "generator CPU",
                 "server CPU", "connections")
    steps = []
    for s in sweeps:
        for st in s.by_rate:
            late = max(r.lateness_us[99.0] for r in st.results) / 1000
            steps.append([
                s.config, s.scenario, f"{st.rate:,.0f}",
                "yes" if st.holds(s.bound_ms) else f"no: {st.why_not(s.bound_ms)}",
                str(len(st.results)),
                _step_ms(st, 50.0), _step_ms(st, 99.0),
                str(st.bad), f"{late:.2f}",
                f"{st.generator_cpu:.0%}", _f(st.server_cpu, ".2f"),
                str(max(r.connections_opened for r in st.results))])
    lines += _table(step_cols, steps)
    if meta.get("skipped"):
        lines += ["", "Not measured: " + "; ".join(meta["skipped"]) + "."]
    if images:
        lines += [""] + [f"![{k}]({v})" for k, v in images.items()]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, runs: Sequence[Run], meta: dict[str, Any],
                 open_runs: Sequence[OpenRun] = ()) -> list[Row]:
    """Write results.json, report.md, throughput.png, latency.png into ``out_dir``."""
    from bench import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    limit = limit_of(meta)
    rows = aggregate(runs, limit)
    open_rows = aggregate_open(open_runs)
    gateways = dict.fromkeys(r.config for r in rows if r.scenario == "grpc-hot"
                             and r.config not in (CEILING, "baseline"))
    check_list = checks(rows) + heavy_checks(rows, open_rows, limit) + [
        c for config in gateways for c in grpc_checks(rows, config)]
    (out_dir / "results.json").write_text(json.dumps({
        "meta": meta,
        "rows": [asdict(r) for r in rows],
        "checks": [asdict(c) for c in check_list],
        "open_loop": [asdict(r) for r in open_rows],
        "runs": [r.to_json() for r in runs],
        "open_runs": [r.to_json() for r in open_runs],
    }, indent=2) + "\n")
    images = {}
    if plots.throughput(out_dir / "throughput.png", rows, meta):
        images["throughput"] = "throughput.png"
    if plots.latency(out_dir / "latency.png", runs):
        images["latency by percentile"] = "latency.png"
    (out_dir / "report.md").write_text(to_markdown(rows, check_list, meta, open_rows, images))
    return rows


def write_sweep_report(out_dir: Path, sweeps: Sequence[Sweep], meta: dict[str, Any]) -> None:
    """Write results.json, sweep.md and sweep.png into ``out_dir``."""
    from bench import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({
        "meta": meta, "sweeps": [s.to_json() for s in sweeps]}, indent=2) + "\n")
    images = {}
    if plots.sweep(out_dir / "sweep.png", sweeps):
        images["latency against offered load"] = "sweep.png"
    (out_dir / "sweep.md").write_text(sweep_markdown(sweeps, meta, images))
