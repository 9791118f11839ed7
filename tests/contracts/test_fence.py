"""The fence itself: every table names code of ours that exists, was read from the installed
version, and its check reports a simulated release's changes naming what to re-check."""

from __future__ import annotations

import re
import types
from importlib.metadata import version

import pytest

from tests.contracts import test_prometheus_client, test_redis, test_uvicorn
from tests.contracts.fence import Fence, check, ours, pin, resolve_use

FENCES = [test_uvicorn.FENCE, test_prometheus_client.FENCE, test_redis.FENCE]


@pytest.mark.parametrize("fence", FENCES, ids=lambda f: f.dependency)
def test_the_pins_were_read_from_the_installed_version(fence: Fence) -> None:
    """A bump is a reviewed change: once every pin of the new version holds (or is updated),
    its ``version`` is set to it."""
    installed = version(fence.dependency)
    assert installed == fence.version, (
        f"{fence.dependency} {installed} is installed, {fence.table} was read from "
        f"{fence.version}: once its pins hold (re-check what they name), set its version to "
        f"{installed!r}")


@pytest.mark.parametrize("fence", FENCES, ids=lambda f: f.dependency)
def test_every_row_names_code_of_ours_that_exists_and_is_pinned_once(fence: Fence) -> None:
    seen = set()
    for p in fence.pins:
        assert (p.module, p.name) not in seen, f"{p.name} pinned twice in {fence.table}"
        seen.add((p.module, p.name))
        assert p.digest is None or re.fullmatch(r"[0-9a-f]{12}", p.digest), p
        for use in p.uses:
            try:
                resolve_use(use)
            except LookupError as exc:
                pytest.fail(f"{fence.table}: {p.name} names {use}, which is gone ({exc}): "
                            "name what of ours relies on it now, or remove the row")


class _Before:
    def method(self, a: int) -> int:
        return a

    def other(self) -> None:
        pass


class _After:
    def method(self, a: int, b: int = 0) -> int:
        return a + b


_FENCE = Fence("pytest", version("pytest"), "tests/contracts/test_fence.py", (
    pin("dep.mod", "Thing.method", None, "server:GatewayHttpProtocol.deliver",
        signature="self, a"),
    pin("dep.mod", "Thing.other", None, "server:_Tick._flush", "metrics:Tally.flush"),
))


def test_a_simulated_release_is_reported_row_by_row() -> None:
    before = types.SimpleNamespace(Thing=_Before)
    assert check(_FENCE, {"dep.mod": before}) == []
    changed, gone = check(_FENCE, {"dep.mod": types.SimpleNamespace(Thing=_After)})
    assert changed.startswith("pytest Thing.method changed its parameters from (self, a) to "
                              "(self, a, b)")
    assert "re-check GatewayHttpProtocol.deliver in gateway/server.py" in changed
    assert "set its signature to 'self, a, b' in tests/contracts/test_fence.py" in changed
    assert gone.startswith("pytest Thing.other is gone from dep.mod")
    assert ("re-check _Tick._flush in gateway/server.py; Tally.flush in gateway/metrics.py"
            in gone)


def test_a_changed_source_is_reported_with_its_new_digest() -> None:
    from tests.contracts.fence import digest_of

    fence = Fence("pytest", version("pytest"), "t.py", (
        pin("dep.mod", "Thing.method", digest_of(_Before.method),
            "server:GatewayHttpProtocol._start_asgi_task"),))
    assert check(fence, {"dep.mod": types.SimpleNamespace(Thing=_Before)}) == []
    (problem,) = check(fence, {"dep.mod": types.SimpleNamespace(Thing=_After)})
    assert problem.startswith("pytest Thing.method changed (digest "
                              f"{digest_of(_Before.method)} read from pytest")
    assert f"then set its digest to {digest_of(_After.method)!r} in t.py" in problem
    assert "re-check GatewayHttpProtocol._start_asgi_task in gateway/server.py" in problem


def test_ours_groups_names_by_file() -> None:
    assert ours(("server:A.b", "server:C", "core.runner:D")) == (
        "A.b, C in gateway/server.py; D in gateway/core/runner.py")
