"""Versioned, verified model artifacts on disk."""

from model_store.store import (
    ArtifactRejected,
    LoadedModel,
    Manifest,
    ModelNotFound,
    ModelStore,
    ModelStoreError,
)

__all__ = [
    "ArtifactRejected",
    "LoadedModel",
    "Manifest",
    "ModelNotFound",
    "ModelStore",
    "ModelStoreError",
]
