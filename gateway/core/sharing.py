"""Whether Redis is consulted for a model version's misses, and why.

Looking a miss up in Redis costs a round trip; it pays when computing the rows costs more. So
the rule compares a model's measured cost for the rows at hand (a lone row:
``Executor.least_small_s``, the least CPU time of its recent calls of one or two rows, as the
round trip is the least of recent PINGs, measured again under load by a lone call due after
every ``_SMALL_DUE_CALLS`` batches; more rows: ``Executor.predicted_s``, the CPU time of one
call with that many rows) with a reference: the Redis round trip measured by the L2 tier
(``RedisCache.round_trip_s``, a windowed minimum of periodic PINGs, kept up to date), but at
least ``floor_s``, the event loop's own work for a lookup (with cross-replica coalescing, a
block's two lease scripts, their futures and bookkeeping: ``gateway.remote.BLOCK_LOOP_S``), or
``GATEWAY_L2_MIN_CALL_US`` when set (0: always consult).

Per model version the decision is a state with hysteresis, so that a model costing about the
reference does not flap: it starts *consulted* (calls not measured yet count as dear), stops
once a small call (one or two rows) is measured at less than the reference, and starts again
once a small call costs ``_START_AT`` times the reference. The band lies above the reference,
not below it: consulting makes the model's own calls look dearer (batched in the thread
beside a busier event loop, its rare lone calls cost more), so a band below the reference
would keep a model cheaper than a lookup consulted for as long as it started so, paying the
lookup on every row. A block of more rows whose call costs at least the reference is looked
up whatever the state, as long as Redis answers such lookups: a model that skips Redis for a
lone row computes a row in about what looking it up costs, so once ``_IDLE_ROWS`` rows of its
bigger blocks in a row were looked up and Redis answered none (no stored value, no row another
replica was computing: rows nobody asked for before), only one such block in ``_PROBE_EVERY`` is
looked up, until one is answered again (``looked_up`` reports every lookup). Cross-replica
coalescing follows the same decision (its lease lives in Redis).

``consult`` is on the request path (an L1 miss): a few comparisons, no allocation unless the
state flips. ``explain`` says the same in words, for ``/v1/models``, V2 metadata and
``/readyz``; a gauge (``gateway_l2_consulted``) says it per model version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gateway.core.runner import Executor, ModelRunner
from gateway.metrics import Metrics

__all__ = ["Sharing"]

log = logging.getLogger("gateway.sharing")

_START_AT = 2.0  # a skipped model is consulted again once a small call costs this many references
_IDLE_ROWS = 4096  # rows looked up in a row with none answered: Redis does not pay for blocks
_PROBE_EVERY = 16  # while it does not, one block in this many is looked up all the same


class Sharing:
    """The Redis rule for every model version of one app; see the module docstring.

    ``round_trip_s()`` gives the measured Redis round trip in seconds (None: not measured yet);
    the reference is that round trip, at least ``floor_s``; ``override_s`` replaces both when
    not None. Event-loop thread only.
    """

    def __init__(self, metrics: Metrics, *, round_trip_s: Callable[[], float | None],
                 floor_s: float = 0.0, override_s: float | None = None) -> None:
        if floor_s < 0 or (override_s is not None and override_s < 0):
            raise ValueError(f"floor_s and override_s must be >= 0, got {floor_s} and "
                             f"{override_s}")
        self._round_trip = round_trip_s
        self._floor = floor_s
        self._override = override_s
        self._gauge = metrics.l2_consulted
        self._skipped: set[int] = set()  # id() of the runners whose misses skip Redis now
        self._seen: dict[int, ModelRunner] = {}  # runners with a gauge child
        self._idle: dict[int, int] = {}  # by id() of runner: rows looked up since one answered
        self._probes: dict[int, int] = {}  # by id() of runner: blocks judged while idle

    def consult(self, runner: ModelRunner, rows: int) -> bool:
        """Should a miss of ``rows`` rows of ``runner`` be looked up in Redis now?"""
        rid = id(runner)
        if rid not in self._seen:  # every version starts consulted
            self._seen[rid] = runner
            self._gauge.labels(runner.manifest.name, str(runner.manifest.version)).set(1)
        ex = runner.executor
        if not ex.measured:
            return True
        ref = self._reference()
        if ref is None:
            return True
        small = _small_s(ex)
        if rid in self._skipped:
            if small >= ref * _START_AT:
                self._flip(runner, True, small, ref)
                return True
            return self._bigger(ex, rows, ref, rid)
        if small < ref:
            self._flip(runner, False, small, ref)
            return self._bigger(ex, rows, ref, rid)
        return True

    def looked_up(self, runner: ModelRunner, rows: int, answered: int) -> None:
        """Report a Redis lookup of ``rows`` rows of ``runner``, ``answered`` of which Redis
        answered (a stored value, or a row another replica was computing)."""
        rid = id(runner)
        self._idle[rid] = 0 if answered else self._idle.get(rid, 0) + rows

    def _bigger(self, ex: Executor, rows: int, ref: float, rid: int) -> bool:
        """Is a block of ``rows`` rows of a model that skips Redis for a lone row looked up:
        does its call cost at least the reference, and has Redis answered one of the model's
        last ``_IDLE_ROWS`` rows looked up? Else one such block in ``_PROBE_EVERY`` is, to
        learn when it does again."""
        if rows <= 2 or ex.predicted_s(rows) < ref:
            return False
        if self._idle.get(rid, 0) < _IDLE_ROWS:
            return True
        n = self._probes[rid] = (self._probes.get(rid, 0) + 1) % _PROBE_EVERY
        return n == 0

    def explain(self, runner: ModelRunner) -> dict[str, Any]:
        """Whether a one-row miss of ``runner`` is looked up in Redis now and why:
        ``{"consulted", "reason", "call_ms", "reference_ms"}`` (the last two None until
        measured)."""
        consulted = self.consult(runner, 1)
        ex = runner.executor
        call = _small_s(ex) if ex.measured else None
        ref = self._reference()
        rtt = self._round_trip()
        if ref is None:
            against = ""
        elif self._override is not None:
            against = f"GATEWAY_L2_MIN_CALL_US {_ms(ref)}"
        elif rtt is None or rtt >= self._floor:
            against = f"Redis round trip {_ms(ref)}"
        else:
            against = f"Redis lookup {_ms(ref)} (its event-loop work; round trip {_ms(rtt)})"
        if call is None:
            reason = "calls not measured yet: consulted until they are"
        elif ref is None:
            reason = "Redis round trip not measured yet: consulted until it is"
        elif self._override == 0:
            reason = "GATEWAY_L2_MIN_CALL_US=0: always consulted"
        elif consulted:
            reason = f"call {_ms(call)} >= {against}"
        elif call < ref:
            reason = f"call {_ms(call)} < {against}: answering again is cheaper"
        else:
            reason = (f"call {_ms(call)} >= {against}, but skipped until it costs "
                      f"{_START_AT:g} times that (it cost less)")
        if not consulted and self._idle.get(id(runner), 0) >= _IDLE_ROWS:
            reason += (f"; bigger blocks: Redis answered none of the last {_IDLE_ROWS:,} rows "
                       f"looked up, one block in {_PROBE_EVERY} looked up")
        return {"consulted": consulted, "reason": reason,
                "call_ms": None if call is None else round(call * 1e3, 4),
                "reference_ms": None if ref is None else round(ref * 1e3, 4)}

    def _reference(self) -> float | None:
        if self._override is not None:
            return self._override
        rtt = self._round_trip()
        return None if rtt is None else max(rtt, self._floor)

    def forget(self, runner: ModelRunner) -> None:
        """Drop what is kept of ``runner`` (its version was unloaded), gauge included."""
        rid = id(runner)
        self._skipped.discard(rid)
        self._idle.pop(rid, None)
        self._probes.pop(rid, None)
        if self._seen.pop(rid, None) is not None:
            try:
                self._gauge.remove(runner.manifest.name, str(runner.manifest.version))
            except KeyError:
                pass

    def _flip(self, runner: ModelRunner, consulted: bool, call_s: float, ref_s: float) -> None:
        if consulted:
            self._skipped.discard(id(runner))
        else:
            self._skipped.add(id(runner))
        m = runner.manifest
        self._gauge.labels(m.name, str(m.version)).set(1 if consulted else 0)
        log.info("model %s v%s: Redis %s (call %s, reference %s)", m.name, m.version,
                 "consulted" if consulted else "skipped", _ms(call_s), _ms(ref_s))


def _small_s(ex: Executor) -> float:
    least = ex.least_small_s
    return ex.predicted_s(1) if least is None else least


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"
