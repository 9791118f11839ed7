"""Fixtures of the store's tests."""

from __future__ import annotations

import pytest

from tests.model_store.booster_cases import Case, make_cases


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], Case]:
    """Every XGBoost and LightGBM family x format x task (``booster_cases``), trained once."""
    return make_cases(tmp_path_factory.mktemp("boosters"))
