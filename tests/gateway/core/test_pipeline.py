"""Single-flight and micro-batching through the HTTP path (in-process), on the real forest;
callers that leave, through the path a door takes (``tests.support.ask``)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.core.pipeline import Answer, Pending
from gateway.core.runner import _SMALL_DUE_CALLS
from gateway.logs import RequestIdFilter
from gateway.protocols.http import Waiting
from tests.support import POISON, ask, probed_app, wait_for, wait_thread_event

pytestmark = pytest.mark.anyio


def q(row: list[float] | np.ndarray) -> str:
    names = ("sepal_length", "sepal_width", "petal_length", "petal_width")
    return "/predict?" + "&".join(f"{n}={v}" for n, v in zip(names, row, strict=True))


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_200_identical_new_rows_make_one_model_call(session_store: Path) -> None:
    async with probed_app(session_store) as (client, probe, gw):
        probe.gate.clear()
        tasks = [asyncio.create_task(client.get(q([6.1, 2.8, 4.7, 1.2]))) for _ in range(200)]
        await wait_thread_event(probe.entered)
        await wait_for(lambda: gw.pipeline.waiting() == 200)
        probe.gate.set()
        responses = await asyncio.gather(*tasks)
        assert {r.json()["prediction"] for r in responses} == {"versicolor"}
        assert probe.calls == 1
        text = (await client.get("/metrics")).text
        assert metric(text, 'gateway_model_calls_total{model="iris",version="1"}') == 1
        assert metric(text, 'gateway_coalesced_total{model="iris"}') == 199


async def test_first_caller_cancelled_others_still_answered(session_store: Path) -> None:
    row = np.array([[6.3, 3.3, 6.0, 2.5]])
    async with probed_app(session_store) as (_client, probe, gw):
        probe.gate.clear()
        first = asyncio.create_task(ask(gw, row))
        await wait_thread_event(probe.entered)
        others = [asyncio.create_task(ask(gw, row)) for _ in range(199)]
        await wait_for(lambda: gw.pipeline.waiting() == 200)
        first.cancel()
        await wait_for(lambda: gw.pipeline.waiting() == 199)
        probe.gate.set()
        answers = await asyncio.gather(*others)
        assert [a.values["label"] for a in answers] == [[b'"virginica"']] * 199
        assert probe.calls == 1
        with pytest.raises(asyncio.CancelledError):
            await first


async def test_256_distinct_rows_batch_into_at_most_5_calls(session_store: Path, random_rows,
                                                            iris_estimator) -> None:
    rows = random_rows[:256]
    async with probed_app(session_store, max_batch_size=64) as (client, probe, gw):
        probe.gate.clear()
        tasks = [asyncio.create_task(client.get(q(r))) for r in rows]
        await wait_thread_event(probe.entered)
        rt = gw.runtime("iris")
        assert rt.batcher is not None
        await wait_for(lambda: rt.batcher.queued_rows + rt.batcher.running_rows == 256)
        probe.gate.set()
        answers = [r.json()["prediction"] for r in await asyncio.gather(*tasks)]
        assert answers == iris_estimator.predict(rows).tolist()
        assert probe.calls <= 5 and probe.rows == 256
        assert max(probe.batch_sizes) <= 64


async def test_a_lone_row_is_computed_alone_once_no_small_call_was_seen_for_long(
        session_store: Path, random_rows) -> None:
    """Under load every call is a batch, and the cost of a lone call (what the Redis rule
    judges a lone row by) would keep its cold first measurement: after ``_SMALL_DUE_CALLS``
    bigger calls, a lone row is computed in a call of its own instead of joining the batch
    waiting, once, and then batching resumes."""
    async with probed_app(session_store, execution="thread") as (_client, probe, gw):
        rt = gw.runtime("iris")
        assert rt.batcher is not None
        (unit,) = rt.units(frozenset({"label"}))
        three = [random_rows[i:i + 3] for i in range(0, 3 * (_SMALL_DUE_CALLS + 2), 3)]
        for block in three[:_SMALL_DUE_CALLS]:
            await rt.compute(unit, block)
        probe.gate.clear()
        probe.entered.clear()
        running = asyncio.create_task(rt.compute(unit, three[-2]))
        await wait_thread_event(probe.entered)
        waiting = asyncio.create_task(rt.compute(unit, three[-1]))  # in the batcher's queue
        await wait_for(lambda: rt.batcher.queued_rows == 3)
        lone = asyncio.create_task(rt.compute(unit, random_rows[300:301]))
        await wait_for(lambda: rt.executor.queued_calls == 1)  # a call of its own
        late = asyncio.create_task(rt.compute(unit, random_rows[301:302]))
        await wait_for(lambda: rt.batcher.queued_rows == 4)  # joins the batch waiting
        probe.gate.set()
        await asyncio.gather(running, waiting, lone, late)
        assert probe.batch_sizes[-3:] == [3, 1, 4]


async def test_poisoned_row_fails_alone(session_store: Path, iris_rows, iris_estimator) -> None:
    rows = iris_rows[:8].tolist()
    rows[3] = [POISON, 1, 1, 1]
    async with probed_app(session_store) as (client, probe, gw):
        probe.gate.clear()
        warm = asyncio.create_task(client.get(q([7.7, 3.8, 6.7, 2.2])))
        await wait_thread_event(probe.entered)
        tasks = [asyncio.create_task(client.get(q(r))) for r in rows]
        rt = gw.runtime("iris")
        await wait_for(lambda: rt.batcher is not None and rt.batcher.queued_rows == 8)
        probe.gate.set()
        await warm
        responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [200, 200, 200, 500, 200, 200, 200, 200]
        assert responses[3].json()["error"]["code"] == "model_error"
        expected = iris_estimator.predict(np.array(rows[:3] + rows[4:])).tolist()
        assert [r.json()["prediction"] for r in responses if r.status_code == 200] == expected
        # the failure was not cached: asking again runs the model again
        calls = probe.calls
        assert (await client.get(q(rows[3]))).status_code == 500
        assert probe.calls == calls + 1


async def test_queue_overflow_is_refused_at_once_with_503(session_store: Path,
                                                          random_rows) -> None:
    async with probed_app(session_store, max_queue_rows=4) as (client, probe, gw):
        probe.gate.clear()
        running = asyncio.create_task(client.get(q(random_rows[0])))
        await wait_thread_event(probe.entered)
        queued = [asyncio.create_task(client.get(q(r))) for r in random_rows[1:5]]
        rt = gw.runtime("iris")
        await wait_for(lambda: rt.batcher is not None and rt.batcher.queued_rows == 4)
        refused = await client.get(q(random_rows[5]))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        probe.gate.set()
        assert all(r.status_code == 200 for r in await asyncio.gather(running, *queued))
        text = (await client.get("/metrics")).text
        assert metric(text, 'gateway_rejected_total{reason="overloaded"}') == 1


async def test_expired_deadline_is_504_and_its_row_is_dropped(session_store: Path,
                                                              random_rows) -> None:
    async with probed_app(session_store) as (client, probe, gw):
        probe.gate.clear()
        running = asyncio.create_task(client.get(q(random_rows[0])))
        await wait_thread_event(probe.entered)
        r = await client.get(q(random_rows[1]), headers={"X-Request-Timeout-Ms": "20"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        rt = gw.runtime("iris")
        await wait_for(lambda: rt.batcher is not None and rt.batcher.queued_rows == 0)
        probe.gate.set()
        assert (await running).status_code == 200
        assert probe.rows == 1  # the expired row never reached the model


async def test_caller_cancelled_while_batch_runs_others_complete(
    session_store: Path, random_rows, iris_estimator
) -> None:
    async with probed_app(session_store) as (client, probe, gw):
        probe.permits = threading.Semaphore(0)  # each model call waits for one release()
        running = asyncio.create_task(ask(gw, random_rows[0:1]))
        await wait_thread_event(probe.entered)
        batch = [asyncio.create_task(ask(gw, random_rows[i:i + 1])) for i in range(1, 6)]
        rt = gw.runtime("iris")
        await wait_for(lambda: rt.batcher is not None and rt.batcher.queued_rows == 5)
        probe.entered.clear()
        probe.permits.release()  # the first call finishes
        await wait_thread_event(probe.entered)  # the 5-row batch is in predict, held
        batch[2].cancel()
        await wait_for(lambda: batch[2].done())
        probe.permits.release()
        done = await asyncio.gather(running, *batch, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        assert all(type(a) is Answer for i, a in enumerate(done) if i != 3), done
        # and the next caller of the cancelled row still gets a correct answer (computed
        # again: the row's only caller had left, so its flight was abandoned)
        probe.permits = None
        r = await client.get(q(random_rows[3]))
        assert r.status_code == 200 and r.headers["x-cache"] == "miss"
        assert r.json()["prediction"] == iris_estimator.predict(random_rows[3:4])[0]


async def test_naive_configuration_calls_predict_per_row(session_store: Path,
                                                         random_rows) -> None:
    async with probed_app(session_store, cache="off", coalesce="off", batch="off") as (
        client, probe, _):
        for _ in range(3):
            r = await client.get(q(random_rows[0]))
            assert r.headers["x-cache"] == "miss"
        r = await client.post("/v1/models/iris/predict",
                              json={"instances": random_rows[:5].tolist()})
        assert r.status_code == 200
        assert probe.calls == 8 and probe.batch_sizes == [1] * 8


async def test_shutdown_drains_then_fails_leftovers_with_503(session_store: Path,
                                                              random_rows) -> None:
    async with probed_app(session_store, shutdown_grace_s=0.05) as (client, probe, gw):
        probe.gate.clear()
        running = asyncio.create_task(client.get(q(random_rows[0])))
        await wait_thread_event(probe.entered)
        queued = asyncio.create_task(client.get(q(random_rows[1])))
        rt = gw.runtime("iris")
        await wait_for(lambda: rt.batcher is not None and rt.batcher.queued_rows == 1)
        closing = asyncio.create_task(gw.drain())  # as the server's shutdown does first
        r = await queued  # not dispatched within the grace period
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert (await client.get("/readyz")).status_code == 503
        refused = await client.get(q(random_rows[2]))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        probe.gate.set()
        await closing
        assert (await running).status_code in (200, 503)


async def test_inline_execution_isolates_a_poisoned_row(session_store: Path,
                                                        random_rows, iris_estimator) -> None:
    async with probed_app(session_store, execution="inline") as (client, probe, _):
        good = await client.get(q(random_rows[0]))
        assert good.status_code == 200
        assert good.json()["prediction"] == iris_estimator.predict(random_rows[:1])[0]
        for _ in range(2):  # the failure is not cached
            bad = await client.get(q([POISON, 1, 1, 1]))
            assert bad.status_code == 500 and bad.json()["error"]["code"] == "model_error"
        r = await client.post("/v1/models/iris/predict",
                              json={"instances": random_rows[1:5].tolist()})
        assert r.json()["predictions"] == iris_estimator.predict(random_rows[1:5]).tolist()
        assert probe.calls >= 4


async def test_labels_and_probabilities_cost_one_model_call(session_store: Path,
                                                            iris_estimator: Any) -> None:
    rows = [[5.0, 3.0, 1.6, 0.2], [6.7, 3.1, 4.7, 1.5], [7.2, 3.0, 5.8, 1.6]]
    async with probed_app(session_store) as (client, probe, _):
        r = (await client.post("/v1/models/iris/predict",
                               json={"instances": rows, "probabilities": True})).json()
        assert probe.calls == 1
        assert r["predictions"] == iris_estimator.predict(rows).tolist()
        assert r["probabilities"] == iris_estimator.predict_proba(rows).tolist()
        labels = (await client.post("/v1/models/iris/predict", json={"instances": rows})).json()
        assert labels["predictions"] == r["predictions"] and labels["cache"] == ["l1"] * 3
        assert probe.calls == 1


@pytest.mark.parametrize(("switches", "calls"), [
    ({}, [12]),  # each distinct row once
    ({"coalesce": "off"}, [16]),  # one call, but each request computes its own rows
    ({"batch": "off"}, [1] * 12),  # a call per request, each distinct row once
    ({"batch": "off", "coalesce": "off"}, [1] * 16),  # a call per request
    ({"max_batch_size": 5}, [5, 5, 2]),  # calls of at most max_batch_size rows
])
async def test_the_misses_of_one_step_respect_the_switches(
        session_store: Path, random_rows, switches: dict[str, str], calls: list[int]) -> None:
    from gateway.app import create_app
    from gateway.settings import Settings
    from model_store import ModelStore
    from tests.support import ProbeLoader, serve_with_state

    loader = ProbeLoader()
    app = create_app(Settings(model_root=session_store, execution="inline", **switches),
                     store=ModelStore(session_store, loader=loader))
    async with serve_with_state(app) as (_client, gw):
        doors = app.doors  # type: ignore[attr-defined]
        door, params, _ = doors.match({"type": "http", "method": "GET", "path": "/predict"})
        requests = [(door, params, {"type": "http", "method": "GET", "path": "/predict",
                                    "headers": [], "state": {"gateway": gw},
                                    "query_string": q(random_rows[i % 12]).split("?")[1].encode()},
                     b"") for i in range(16)]
        replies = doors.answer(requests)
        assert [r.status for r in replies] == [200] * 16
        assert loader.latest().batch_sizes == calls


async def test_requests_of_one_step_share_one_inline_call(
        session_store: Path, random_rows, iris_estimator,
        caplog: pytest.LogCaptureFixture) -> None:
    """What the server does with the door requests of one event-loop step: their misses go
    to the model in one call, each distinct row once; a row the model refuses sends its
    requests the slower way, where it fails alone."""
    from gateway.app import create_app
    from gateway.settings import Settings
    from model_store import ModelStore
    from tests.support import ProbeLoader, serve_with_state

    loader = ProbeLoader()
    app = create_app(Settings(model_root=session_store, execution="inline"),
                     store=ModelStore(session_store, loader=loader))
    async with serve_with_state(app) as (_client, gw):
        probe = loader.latest()
        doors = app.doors  # type: ignore[attr-defined]
        door, params, _ = doors.match({"type": "http", "method": "GET", "path": "/predict"})

        def request(row: Any) -> tuple[Any, dict[str, str], dict[str, Any], bytes]:
            scope = {"type": "http", "method": "GET", "path": "/predict", "headers": [],
                     "query_string": q(row).split("?", 1)[1].encode(),
                     "state": {"gateway": gw}}
            return door, params, scope, b""

        rows = [random_rows[i % 12] for i in range(16)]  # 12 distinct rows, 4 asked twice
        replies = doors.answer([request(r) for r in rows])
        assert probe.batch_sizes == [12]
        expected = iris_estimator.predict(np.array(rows))
        assert [json.loads(r.body)["prediction"] for r in replies] == expected.tolist()

        calls = probe.calls
        poisoned = [random_rows[20], [POISON, 1, 1, 1], random_rows[21]]
        waiting = doors.answer([request(r) for r in poisoned])
        assert all(isinstance(w, Waiting) for w in waiting)  # the one call failed
        assert doors.together(waiting) == [[0, 1, 2]]  # completed as one group
        caplog.handler.addFilter(RequestIdFilter())
        replies = await doors.finish_many(waiting)
        assert [r.status for r in replies] == [200, 500, 200]  # the refused row fails alone
        assert probe.calls > calls + 1
        warned = [r for r in caplog.records if r.name == "gateway.runner"]
        rid = dict(replies[1].headers)[b"x-request-id"].decode()
        assert warned and all(r.request_id == rid for r in warned)  # type: ignore[attr-defined]


async def test_waiting_requests_begun_together_finish_as_one_group(
        session_store: Path, random_rows, iris_estimator) -> None:
    """A step's waiting requests of one model: one group, one model call for the distinct
    rows; a row two of them miss is computed once and counted as coalesced."""
    async with probed_app(session_store, execution="thread") as (client, probe, gw):
        rt = gw.runtime("iris")
        rows = [random_rows[30], random_rows[31], random_rows[30], random_rows[32]]
        begun = gw.begin([(rt, np.array([r]), frozenset({"label"})) for r in rows])
        assert all(isinstance(b, Pending) for b in begun)
        assert gw.together(begun) == [[0, 1, 2, 3]]
        answers = await gw.finish_many(begun, 30.0)
        expected = iris_estimator.predict(np.array(rows)).tolist()
        assert [json.loads(a.values["label"][0]) for a in answers] == expected
        assert [a.sources for a in answers] == [["miss"]] * 4
        assert probe.batch_sizes == [3]
        text = (await client.get("/metrics")).text
        assert metric(text, 'gateway_coalesced_total{model="iris"}') == 1


async def test_groups_hold_at_most_a_batch_of_missing_rows(session_store: Path,
                                                          random_rows) -> None:
    async with probed_app(session_store, execution="thread", max_batch_size=4) as (
            _client, _probe, gw):
        rt = gw.runtime("iris")
        sizes = [2, 2, 1, 5, 3]  # the block of 5 is over the batch: alone
        blocks, at = [], 40
        for n in sizes:
            blocks.append(np.array(random_rows[at:at + n]))
            at += n
        begun = gw.begin([(rt, b, frozenset({"label"})) for b in blocks])
        assert gw.together(begun) == [[0, 1], [2, 4], [3]]


async def test_a_group_past_its_deadline_fails_each_request(session_store: Path,
                                                            random_rows) -> None:
    async with probed_app(session_store, execution="thread") as (_client, probe, gw):
        rt = gw.runtime("iris")
        probe.gate.clear()
        begun = gw.begin([(rt, np.array([random_rows[50 + i]]), frozenset({"label"}))
                          for i in range(3)])
        finishing = asyncio.create_task(gw.finish_many(begun, 0.05))
        await wait_thread_event(probe.entered)
        results = await finishing
        probe.gate.set()
        assert [type(r).__name__ for r in results] == ["DeadlineExceeded"] * 3


async def test_doors_group_waiting_requests_by_deadline(session_store: Path,
                                                        random_rows) -> None:
    from gateway.app import create_app
    from gateway.settings import Settings
    from model_store import ModelStore
    from tests.support import ProbeLoader, serve_with_state

    app = create_app(Settings(model_root=session_store, execution="thread"),
                     store=ModelStore(session_store, loader=ProbeLoader()))
    async with serve_with_state(app) as (_client, gw):
        doors = app.doors  # type: ignore[attr-defined]
        door, params, _ = doors.match({"type": "http", "method": "GET", "path": "/predict"})

        def request(row: Any, timeout_ms: str) -> tuple[Any, dict[str, str], dict[str, Any],
                                                         bytes]:
            scope = {"type": "http", "method": "GET", "path": "/predict",
                     "headers": [(b"x-request-timeout-ms", timeout_ms.encode())],
                     "query_string": q(row).split("?", 1)[1].encode(),
                     "state": {"gateway": gw}}
            return door, params, scope, b""

        waiting = doors.answer([request(random_rows[60 + i], t)
                                for i, t in enumerate(["5000", "9000", "5000"])])
        assert doors.together(waiting) == [[0, 2], [1]]
        replies = [r for g in doors.together(waiting)
                   for r in await doors.finish_many([waiting[n] for n in g])]
        assert [r.status for r in replies] == [200, 200, 200]


@pytest.mark.parametrize("switch", [{"coalesce": "off"}, {"batch": "off"}])
async def test_without_coalescing_or_batching_each_waiting_request_is_a_group_alone(
        session_store: Path, random_rows, switch: dict[str, str]) -> None:
    async with probed_app(session_store, execution="thread", **switch) as (
            _client, _probe, gw):
        rt = gw.runtime("iris")
        rows = [random_rows[70], random_rows[71], random_rows[70]]
        begun = gw.begin([(rt, np.array([r]), frozenset({"label"})) for r in rows])
        assert gw.together(begun) == [[0], [1], [2]]
