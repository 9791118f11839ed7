"""The runner's choices: which scenarios a foreign server is asked, distinct rows per run."""

from __future__ import annotations

from bench.runner import Bench, Options, Target
from bench.scenarios import SCENARIOS
from tests.bench.checker import Expect, checking_server

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def test_a_foreign_server_is_asked_only_what_its_doors_answer() -> None:
    bench = Bench(Options(configs=(), scenarios=("hot", "v2-json-unique")), lambda _m: None,
                  FEATURES)
    # A server that answers V2 JSON only (everything else is a 400).
    with checking_server(Expect("v2-json", FEATURES, model="forest")) as url:
        target = Target("baseline", url, None, False, "forest")
        assert bench._answers(target, SCENARIOS["v2-json-unique"])
        assert not bench._answers(target, SCENARIOS["hot"])
        assert not bench._answers(target, SCENARIOS["v2-bin-hot"])
    assert bench.skipped == ["baseline: hot (one request answered 400)",
                             "baseline: v2-bin-hot (one request answered 400)"]


def test_loads_carry_the_targets_model_and_fresh_salts() -> None:
    opts = Options(configs=(), scenarios=(), v2_input="input__0", v2_datatype="FP32")
    bench = Bench(opts, lambda _m: None, FEATURES)
    load = bench.load(SCENARIOS["v2-bin-32-unique"], "forest", bench.salts.py())
    assert (load.door, load.rows, load.model, load.v2_input, load.v2_datatype) == (
        "v2-bin", 32, "forest", "input__0", "FP32")
    salts = {bench.salts.py() for _ in range(100)} | {load.salt}
    assert len(salts) == 101
    assert len({bench.salts.wrk() for _ in range(100)}) == 100
