"""The report's figures: throughput bars, latency by percentile, latency against offered load.

One colour per configuration in every panel and every figure (``colours``), one legend per
figure placed outside the axes, axes labelled with their units, and only measured values
drawn (a percentile a run did not measure is left out, never drawn as zero).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.scenarios import CEILING, SCENARIOS

if TYPE_CHECKING:
    from bench.report import Row
    from bench.runner import Run
    from bench.sweep import Sweep

__all__ = ["colours", "latency", "latency_figure", "sweep", "sweep_figure", "throughput",
           "throughput_figure"]

_KNOWN = ("naive", "cache", "cache+coalesce", "full", "nocache", "compiled", "compiled-naive",
          "target", "baseline")
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22")
_EXTRA = ("#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39")


def colours(configs: Sequence[str]) -> dict[str, str]:
    """A fixed colour per configuration name (the same in every figure of every report)."""
    out = {CEILING: "#000000"}
    out.update(zip(_KNOWN, _PALETTE, strict=True))
    extra = iter(_EXTRA * (1 + len(configs) // len(_EXTRA)))
    for c in configs:
        if c not in out:
            out[c] = next(extra)
    return {c: out[c] for c in configs}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain(axis: Any, fmt: str) -> None:
    """Log-scale ticks at 1, 2 and 5 of each decade, labelled as plain numbers (``1,000``,
    ``0.5``), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: format(v, fmt)))
    axis.set_minor_formatter(NullFormatter())


def _title(scenario: str) -> str:
    sc = SCENARIOS.get(scenario)
    return f"{scenario}\n{sc.description}" if sc else scenario


def _legend(fig: Any, handles: list[Any], labels: list[str]) -> None:
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small",
               frameon=False)


def _save(fig: Any, path: Path) -> bool:
    if fig is None:
        return False
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return True


def throughput(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> bool:
    """Write ``throughput_figure``; False when there is nothing to draw."""
    return _save(throughput_figure(rows, meta), path)


def latency(path: Path, runs: Sequence[Run]) -> bool:
    """Write ``latency_figure``; False when no run measured latency."""
    return _save(latency_figure(runs), path)


def sweep(path: Path, sweeps: Sequence[Sweep]) -> bool:
    """Write ``sweep_figure``; False when there is nothing to draw."""
    return _save(sweep_figure(sweeps), path)


def throughput_figure(rows: Sequence[Row], meta: dict[str, Any]) -> Any:
    """Bars of req/s per scenario (log scale), one colour per configuration, min-max
    whiskers (none for one repetition); a configuration that did not measure a scenario the
    others did is marked "not measured" in its place. None when there is nothing to draw.
    Scenarios only the ceiling ran (its reference for a door) are left to the table."""
    scenarios = [s for s in dict.fromkeys(r.scenario for r in rows if r.config != CEILING)
                 if s != "burst"]
    if not scenarios:
        return None
    plt = _pyplot()
    configs = list(dict.fromkeys(r.config for r in rows if r.scenario in scenarios))
    colour = colours(configs)
    by = {(r.config, r.scenario): r for r in rows}
    reps = meta.get("repetitions")
    spread = reps != 1
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(scenarios) * max(1, len(configs) / 4)),
                                    4.5))
    width = 0.8 / max(1, len(configs))
    handles = []
    for i, config in enumerate(configs):
        xs, ys, lo, hi = [], [], [], []
        for j, sc in enumerate(scenarios):
            r = by.get((config, sc))
            if r is None or r.rps <= 0:
                if config == CEILING:  # it measures the hot load of each door only
                    continue
                ax.text(j + i * width, 0.02, "not measured", transform=ax.get_xaxis_transform(),
                        rotation=90, ha="center", va="bottom", fontsize=6,
                        color=colour[config])
                continue
            xs.append(j + i * width)
            ys.append(r.rps)
            lo.append(r.rps - r.rps_min)
            hi.append(r.rps_max - r.rps)
        handles.append(ax.bar(xs, ys, width, yerr=[lo, hi] if spread else None,
                              color=colour[config], capsize=2, error_kw={"elinewidth": 0.8}))
    ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(scenarios))],
                  scenarios, rotation=30 if len(scenarios) > 5 else 0, ha="right"
                  if len(scenarios) > 5 else "center")
    ax.set_yscale("log")
    _plain(ax.yaxis, ",.0f")
    ax.set_xlabel("scenario")
    ax.set_ylabel(f"requests/s (median of {reps}, whiskers min-max)" if spread
                  else "requests/s (one run)")
    ax.set_title("Throughput per configuration (closed loop, wrk)")
    ax.grid(axis="y", alpha=0.3, which="both")
    _legend(fig, handles, configs)
    fig.tight_layout()
    return fig


_TICKS = (50.0, 90.0, 99.0, 99.9)
_MAX_X = 3.6  # where the measured maximum is drawn, right of 99.9


def _x(p: float) -> float:
    return -math.log10(1 - p / 100)


def latency_figure(runs: Sequence[Run]) -> Any:
    """Latency (ms, log) by percentile (50 to 99.9, then the measured maximum), one panel
    per closed-loop scenario: median over repetitions, band min-max (none for one run); a
    panel names the configurations that did not measure its scenario. None when no run
    measured latency. Scenarios only the ceiling ran are left out."""
    scenarios = list(dict.fromkeys(r.scenario for r in runs
                                   if r.latency_us and r.config != CEILING))
    if not scenarios:
        return None
    plt = _pyplot()
    configs = list(dict.fromkeys(r.config for r in runs if r.latency_us))
    colour = colours(configs)
    cols = min(4, len(scenarios))
    nrows = math.ceil(len(scenarios) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False)
    handles: dict[str, Any] = {}
    spread = False
    for ax, sc in zip(axes.flat, scenarios, strict=False):
        missing = []
        for config in configs:
            rs = [r for r in runs if r.config == config and r.scenario == sc and r.latency_us]
            if not rs:
                if config != CEILING:
                    missing.append(config)
                continue
            ps = sorted(p for p in rs[0].latency_us if 50.0 <= p < 100.0)
            xs = [_x(p) for p in ps]
            values = [[r.latency_us[p] / 1000 for r in rs if p in r.latency_us] for p in ps]
            med = [statistics.median(v) for v in values]
            (line,) = ax.plot(xs, med, color=colour[config], lw=1.4)
            if len(rs) > 1:
                spread = True
                ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values],
                                color=colour[config], alpha=0.15, lw=0)
            maxima = [r.latency_us[100.0] / 1000 for r in rs if r.latency_us.get(100.0)]
            if maxima:  # only a measured maximum (older wrk scripts reported 0)
                ax.plot([xs[-1], _MAX_X], [med[-1], statistics.median(maxima)], ls=":",
                        marker="o", ms=3, markevery=[1], color=colour[config], lw=1)
            handles.setdefault(config, line)
        ax.set_xticks([_x(p) for p in _TICKS] + [_MAX_X],
                      [f"{p:g}" for p in _TICKS] + ["max"])
        ax.set_xlim(_x(50.0) - 0.1, _MAX_X + 0.2)
        ax.set_yscale("log")
        _plain(ax.yaxis, "g")
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (ms)")
        ax.set_title(_title(sc), fontsize="medium")
        ax.grid(alpha=0.3, which="both")
        if missing:
            ax.text(0.02, 0.98, "not measured: " + ", ".join(missing), transform=ax.transAxes,
                    ha="left", va="top", fontsize=6)
    for ax in list(axes.flat)[len(scenarios):]:
        ax.set_visible(False)
    _legend(fig, list(handles.values()), list(handles))
    fig.suptitle("Latency by percentile (closed loop, wrk; median of repetitions, "
                 "band min-max)" if spread else "Latency by percentile (closed loop, wrk; "
                 "one run)")
    fig.tight_layout()
    return fig


def sweep_figure(sweeps: Sequence[Sweep]) -> Any:
    """p50 (dashed) and p99 (solid) latency against offered load, one panel per scenario,
    one colour per configuration, the capacity (knee) starred, the p99 bound dotted. Steps
    where the generator fell behind are hollow (their latency is an upper bound of the
    server's), or left out when that bound is past the p99 bound (they prove nothing); steps
    with failed requests are crosses. None when there is nothing to draw."""
    scenarios = list(dict.fromkeys(s.scenario for s in sweeps if s.steps))
    if not scenarios:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D

    configs = list(dict.fromkeys(s.config for s in sweeps))
    colour = colours(configs)
    cols = min(3, len(scenarios))
    nrows = math.ceil(len(scenarios) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    bound = sweeps[0].bound_ms
    for ax, sc in zip(axes.flat, scenarios, strict=False):
        for s in (s for s in sweeps if s.scenario == sc):
            steps = [st for st in s.by_rate if st.valid or st.holds(s.bound_ms)]
            if not steps:
                continue
            c = colour[s.config]
            rates = [st.rate for st in steps]
            ax.plot(rates, [st.p99_ms for st in steps], color=c, lw=1.5, marker="o", ms=3)
            ax.plot(rates, [st.p50_ms for st in steps], color=c, lw=1.2, ls="--", marker=".",
                    ms=4)
            late = [st for st in steps if not st.valid]
            for values in ([st.p99_ms for st in late], [st.p50_ms for st in late]):
                ax.plot([st.rate for st in late], values, ls="", marker="o", ms=6,
                        markerfacecolor="white", markeredgecolor=c)
            failed = [st for st in steps if st.bad]
            ax.plot([st.rate for st in failed], [st.p99_ms for st in failed], ls="",
                    marker="x", ms=7, color=c)
            knee = s.knee
            if knee is not None:
                ax.plot([knee.rate], [knee.p99_ms], marker="*", ms=14, color=c,
                        markeredgecolor="black", markeredgewidth=0.6, ls="")
                ax.annotate(f"{knee.rate:,.0f}/s", (knee.rate, knee.p99_ms),
                            textcoords="offset points", xytext=(4, -12), fontsize="x-small",
                            color=c)
        ax.axhline(bound, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain(ax.xaxis, ",.0f")
        _plain(ax.yaxis, "g")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(_title(sc), fontsize="medium")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(scenarios):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colour[c], lw=3) for c in configs]
    labels = list(configs)
    handles += [Line2D([], [], color="black", lw=1.5, marker="o", ms=3),
                Line2D([], [], color="black", lw=1.2, ls="--", marker=".", ms=4),
                Line2D([], [], color="black", ls="", marker="*", ms=12),
                Line2D([], [], color="black", ls="", marker="x", ms=7),
                Line2D([], [], ls="", marker="o", ms=6, markerfacecolor="white",
                       markeredgecolor="black"),
                Line2D([], [], color="grey", ls=":")]
    labels += ["p99", "p50", f"capacity: highest rate with p99 < {bound:g} ms",
               "requests without a 2xx answer", "generator late: an upper bound",
               f"p99 bound ({bound:g} ms)"]
    _legend(fig, handles, labels)
    fig.suptitle("Latency against offered load (open loop, fixed arrival rate)")
    fig.tight_layout()
    return fig
