"""Requests of every door, as the fixed-rate generator sends them, checked by a server that
parses each door's framing."""

from __future__ import annotations

import numpy as np
import pytest

from bench.doors import HOT_ROW, Load, build, unique_rows
from bench.loadgen import Settings, run
from bench.scenarios import SCENARIOS
from tests.bench.checker import Expect, checking_server

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
HEAVY = tuple(f"f{i}" for i in range(20))
DOOR_SCENARIOS = [s for s in SCENARIOS.values() if s.open_loop]


def _send(load: Load, n: int) -> Expect:
    expect = Expect(load.door, load.features, load.rows, load.model)
    with checking_server(expect) as url:
        settings = Settings(url=url, rate=400, duration_s=n / 400, connections=2)
        result = run(build(load, n, url.removeprefix("http://")), settings)
    assert result.answered == n and result.bad == 0, (expect.bad[:3], result.verdict)
    assert expect.requests == n and not expect.bad
    return expect


@pytest.mark.parametrize("sc", DOOR_SCENARIOS, ids=lambda s: s.name)
def test_every_scenario_is_well_formed_on_its_door(sc) -> None:
    expect = _send(Load(sc.door, sc.keys, FEATURES, rows=sc.rows, salt=3), 24)
    rows = expect.seen
    assert len(rows) == 24 * sc.rows
    if sc.keys == "unique":
        assert len(set(rows)) == len(rows)  # no row asked twice
    if sc.keys == "hot":
        assert set(rows) == {HOT_ROW}


@pytest.mark.parametrize(("door", "rows"), [("v2-json", 32), ("v2-bin", 32), ("v2-bin", 1)])
def test_fp32_tensors_keep_unique_rows_unique(door, rows) -> None:
    load = Load(door, "unique", FEATURES, rows=rows, salt=4, v2_datatype="FP32",
                v2_input="input__0")
    seen = _send(load, 12).seen
    assert len(set(seen)) == len(seen) == 12 * rows


def test_a_wide_model_and_another_name() -> None:
    expect = _send(Load("v2-bin", "unique", HEAVY, rows=32, model="heavy", salt=5), 8)
    assert len(set(expect.seen)) == 8 * 32
    expect = _send(Load("get", "zipf", HEAVY, model="heavy", seed=2), 16)
    assert len(expect.seen) == 16


def test_unique_rows_are_distinct_across_salts_and_exact_in_fp32() -> None:
    a = unique_rows(1, 0, 5000, 4)
    b = unique_rows(2, 0, 5000, 4)
    c = unique_rows(1, 2 ** 32 - 5000, 5000, 4)
    both = np.concatenate([a, b, c])
    assert len({tuple(r) for r in both.tolist()}) == 15_000
    assert np.array_equal(both.astype(np.float32).astype(np.float64), both)
    # odd multiples of 1/1024 in [0, 8): never a value of the wrk scripts' rows
    assert np.all((both * 1024) % 2 == 1) and both.min() > 0 and both.max() < 8


def test_loads_are_checked() -> None:
    with pytest.raises(ValueError):
        Load("get", "hot", FEATURES, rows=2)
    with pytest.raises(ValueError):
        Load("grpc", "hot", FEATURES)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Load("v2-json", "hot", FEATURES, v2_datatype="INT8")
    with pytest.raises(ValueError):
        Load("get", "unique", FEATURES, salt=2 ** 16)
