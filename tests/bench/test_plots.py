"""The report's figures: one legend, one colour per configuration in every panel, labelled
axes, nothing drawn that was not measured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_hex

from bench import plots
from bench.report import aggregate
from bench.runner import CEILING, Run
from bench.sweep import Step, Sweep
from tests.bench.test_sweep import result

CONFIGS = ["naive", "full", "compiled"]


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def _runs(with_max: bool) -> list[Run]:
    out = []
    for config in [CEILING, *CONFIGS]:
        for scenario in ("hot", "unique", "zipf"):
            for rep in range(2):
                lat = {50.0: 1000 + rep, 90.0: 2000, 99.0: 3000, 99.9: 4000,
                       100.0: 9000 if with_max else 0}
                out.append(Run(config, scenario, rep, 1000, 1.0, 0, lat))
    # a scenario measured by one configuration only: panels differ in who is drawn
    out.append(Run("compiled", "lowload", 0, 1000, 1.0, 0, {50.0: 100, 99.0: 200}))
    # the ceiling's reference for another door: in the tables, not in the figures
    out.append(Run(CEILING, "v2-bin-hot", 0, 1000, 1.0, 0, {50.0: 100, 99.0: 200}))
    return out


def _one_legend(fig: Any) -> list[str]:
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    return [t.get_text() for t in fig.legends[0].get_texts()]


def _labelled(fig: Any) -> None:
    for ax in fig.axes:
        if ax.get_visible():
            assert ax.get_xlabel() and ax.get_ylabel()
            assert "ms" in ax.get_ylabel() or "/s" in ax.get_ylabel()


def test_colours_are_fixed_per_configuration() -> None:
    a = plots.colours(["full", "naive", "baseline", "mystery"])
    b = plots.colours(["mystery", "compiled", "naive", "full"])
    assert a["full"] == b["full"] and a["naive"] == b["naive"] and a["mystery"] == b["mystery"]
    assert len(set(plots.colours([CEILING, *CONFIGS, "baseline"]).values())) == 5


def test_latency_panels_share_colours_and_one_legend_and_skip_unmeasured_max(
        tmp_path: Path) -> None:
    colour = plots.colours([CEILING, *CONFIGS])
    for with_max in (False, True):
        fig = plots.latency_figure(_runs(with_max))
        assert _one_legend(fig) == [CEILING, *CONFIGS]
        _labelled(fig)
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title().split("\n")[0] for ax in panels] == [
            "hot", "unique", "zipf", "lowload"]
        for ax in panels:
            for line in ax.get_lines():
                assert to_hex(line.get_color()) in colour.values()
            ys = [y for line in ax.get_lines() for y in line.get_ydata()]
            assert min(ys) > 0  # no zero drawn on a log axis
            maxima = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
            assert len(maxima) == (len(ax.get_lines()) // 2 if with_max else 0)
        lowload = panels[3].get_lines()
        assert [to_hex(line.get_color()) for line in lowload] == [colour["compiled"]]
    assert plots.latency(tmp_path / "latency.png", _runs(True))
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert not plots.latency(tmp_path / "none.png", [])


def test_throughput_legend_sits_outside_the_bars(tmp_path: Path) -> None:
    rows = aggregate(_runs(True))
    fig = plots.throughput_figure(rows, {"repetitions": 2})
    assert _one_legend(fig) == [CEILING, *CONFIGS]
    _labelled(fig)
    fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [
        "hot", "unique", "zipf", "lowload"]
    legend = fig.legends[0].get_window_extent()
    axes = fig.axes[0].get_window_extent()
    assert legend.x0 >= axes.x1  # beside the axes, never over a bar
    assert plots.throughput(tmp_path / "t.png", rows, {"repetitions": 2})


def test_sweep_curves_mark_the_knee_in_the_configuration_colour(tmp_path: Path) -> None:
    sweeps = []
    for config, cap in (("naive", 200), ("full", 3000), ("compiled", 10000)):
        s = Sweep(config, "unique", 50.0)
        s.steps = [Step(r, [result(r, 1.0, 5.0 if r <= cap else 300.0,
                                   lateness_ms=2.0 if r == 100 else 0.05)])
                   for r in (100, 200, 500, 1000, 3000, 5000, 10000, 15000) if r <= cap * 2]
        sweeps.append(s)
    fig = plots.sweep_figure(sweeps)
    labels = _one_legend(fig)
    assert labels[:3] == CONFIGS and "p99" in labels and "p50" in labels
    _labelled(fig)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "offered load (requests/s)"
    colour = plots.colours(CONFIGS)
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert [(to_hex(s.get_color()), s.get_xdata()[0]) for s in stars] == [
        (colour["naive"], 200), (colour["full"], 3000), (colour["compiled"], 10000)]
    # the late steps (100/s): hollow, an upper bound, in the configuration's colour
    hollow = [line for line in ax.get_lines() if line.get_markerfacecolor() == "white"]
    assert len(hollow) == 2 * 3 and all(line.get_xdata()[0] == 100 for line in hollow)
    assert plots.sweep(tmp_path / "s.png", sweeps)
    assert not plots.sweep(tmp_path / "none.png", [])


def _texts(fig: Any) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_one_repetition_draws_no_spread_and_says_so() -> None:
    runs = [r for r in _runs(True) if r.rep == 0]
    fig = plots.throughput_figure(aggregate(runs), {"repetitions": 1})
    ax = fig.axes[0]
    assert ax.get_ylabel() == "requests/s (one run)"
    assert not [c for c in ax.containers if getattr(c, "has_yerr", False)]
    fig = plots.latency_figure(runs)
    assert "one run" in fig._suptitle.get_text()
    assert not [c for ax in fig.axes for c in ax.collections]  # no min-max bands
    fig = plots.latency_figure(_runs(True))
    assert "band min-max" in fig._suptitle.get_text()
    assert [c for ax in fig.axes for c in ax.collections]


def test_a_scenario_a_configuration_did_not_measure_is_marked() -> None:
    runs = _runs(True)
    fig = plots.throughput_figure(aggregate(runs), {"repetitions": 2})
    assert _texts(fig).count("not measured") == 2  # lowload: naive and full
    fig = plots.latency_figure(runs)
    assert "not measured: naive, full" in _texts(fig)
