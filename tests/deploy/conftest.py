from __future__ import annotations

import pytest

from bench.replicas import nginx_binary


@pytest.fixture(scope="session")
def nginx() -> str:
    """The nginx executable; a missing one fails the deployment tests with how to install it."""
    try:
        return nginx_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc))

