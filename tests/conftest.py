"""Fixtures shared by the suite, and the rule that keeps ``-m "not e2e and not slow"`` free of
processes: a test that starts one (a gateway or another Python, redis-server, nginx, wrk) is
``e2e``.

Tests using a fixture that starts a process (``redis_server``, ``redis_fault_server``) are
marked ``e2e`` here; every other such test carries the mark itself. A test without the mark that
starts one of the programs the suite runs anyway fails at teardown, naming what it started.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import procs
from model_store import ModelStore
from model_store.demo import IRIS_FEATURES, iris_data, train_iris

PROCESS_FIXTURES = frozenset({"redis_server", "redis_fault_server"})
"""Fixtures that start a process: a test using one, directly or through another fixture, is
marked ``e2e``."""

_STARTS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.spawn"})  # audit events
_PROGRAMS = re.compile(r"python[\d.]*|redis-server|redis-cli|nginx|wrk|podman|docker|uvicorn")
"""What the suite starts (Python: a gateway, the load generator, a script). Libraries' own
probes (``ldconfig`` for ``ctypes.util.find_library``, ``lscpu`` for joblib's core count) are
not tests starting processes, and run in whichever test comes first."""


class _ProcessWatch:
    """The programs started while a test without the ``e2e`` mark runs (set up, called and
    torn down); fed by a ``sys`` audit hook, which cannot be removed, so it only records while
    ``watching``."""

    def __init__(self) -> None:
        self.watching = False
        self.started: list[str] = []

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.watching or event not in _STARTS:
            return
        path, argv = (args[0], args[1]) if event != "os.spawn" else (args[1], args[2])
        argv = [argv] if isinstance(argv, str | bytes) else list(argv)
        if _PROGRAMS.fullmatch(os.path.basename(os.fsdecode(path or argv[0]))):
            self.started.append(" ".join(map(os.fsdecode, argv))[:120])

    def start(self, watching: bool) -> None:
        self.watching, self.started = watching, []

    def stop(self) -> list[str]:
        self.watching = False
        return self.started


_WATCH = pytest.StashKey[_ProcessWatch]()


def pytest_configure(config: pytest.Config) -> None:
    watch = _ProcessWatch()
    config.stash[_WATCH] = watch
    sys.addaudithook(watch.audit)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    item.config.stash[_WATCH].start(watching=item.get_closest_marker("e2e") is None)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        result = yield
    finally:
        started = item.config.stash[_WATCH].stop()
    if started:
        pytest.fail(f"{item.nodeid} is not marked e2e but started: " + "; ".join(started)
                    + " (mark it pytest.mark.e2e, and slow if it takes more than a few seconds)",
                    pytrace=False)
    return result


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[procs.RedisServer]:
    """A redis-server of the test session's own, on a free port (never the machine's 6379)
    and a unix socket."""
    with procs.redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def iris_estimator() -> object:
    return train_iris()


@pytest.fixture(scope="session")
def iris_rows() -> np.ndarray:
    return iris_data()[0]


@pytest.fixture(scope="session")
def random_rows() -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.round(rng.uniform([4, 2, 1, 0], [8, 4.5, 7, 2.5], size=(1000, 4)), 2)


@pytest.fixture(scope="session")
def session_store(tmp_path_factory: pytest.TempPathFactory, iris_estimator: object) -> Path:
    """A store with iris v1 on the sklearn backend, shared read-only by the session."""
    root = tmp_path_factory.mktemp("models")
    ModelStore(root).register(iris_estimator, "iris", features=IRIS_FEATURES, backend="sklearn")
    return root


@pytest.fixture
def store_root(tmp_path: Path, iris_estimator: object) -> Iterator[Path]:
    """A store with iris v1 (sklearn backend) of the test's own (tests may add versions)."""
    root = tmp_path / "models"
    ModelStore(root).register(iris_estimator, "iris", features=IRIS_FEATURES, backend="sklearn")
    yield root


@pytest.fixture(scope="session")
def redis_fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[procs.RedisServer]:
    """A second one, for tests that stop and restart it."""
    with procs.redis_server(tmp_path_factory.mktemp("redis-fault")) as server:
        yield server


@pytest.fixture(scope="session")
def compiled_store(tmp_path_factory: pytest.TempPathFactory, iris_estimator: object,
                   iris_rows: np.ndarray) -> Path:
    """A store with iris v1 compiled to ONNX and verified, shared read-only by the session."""
    root = tmp_path_factory.mktemp("compiled")
    ModelStore(root).register(iris_estimator, "iris", features=IRIS_FEATURES, backend="onnx",
                              train_rows=iris_rows)
    return root
