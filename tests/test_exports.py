"""The public surface of each package is pinned here; changing it is a deliberate act."""

from __future__ import annotations

import gateway
import model_store


def test_gateway_exports() -> None:
    assert gateway.__all__ == ["Settings", "create_app"]


def test_model_store_exports() -> None:
    assert model_store.__all__ == [
        "ArtifactRejected",
        "LoadedModel",
        "Manifest",
        "ModelNotFound",
        "ModelSettings",
        "ModelStore",
        "ModelStoreError",
        "StoreChanges",
    ]
    for name in model_store.__all__:
        assert getattr(model_store, name).__module__ in ("model_store.store",
                                                          "model_store.settings")


def test_bench_exports() -> None:
    import bench

    assert bench.__all__ == ["Options", "Run", "ZipfSampler", "run_bench"]
