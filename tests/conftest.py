from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pytest_redis import factories

from model_store import ModelStore
from model_store.demo import IRIS_FEATURES, iris_data, train_iris

# A redis-server of the test session's own, on a free port (never the machine's 6379).
redis_server = factories.redis_proc(port=None)


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


# A second one, for tests that stop and restart it.
redis_fault_server = factories.redis_proc(port=None)


@pytest.fixture(scope="session")
def compiled_store(tmp_path_factory: pytest.TempPathFactory, iris_estimator: object,
                   iris_rows: np.ndarray) -> Path:
    """A store with iris v1 compiled to ONNX and verified, shared read-only by the session."""
    root = tmp_path_factory.mktemp("compiled")
    ModelStore(root).register(iris_estimator, "iris", features=IRIS_FEATURES, backend="onnx",
                              train_rows=iris_rows)
    return root
