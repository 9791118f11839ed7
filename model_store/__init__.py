"""Versioned, verified model artifacts on disk."""

from model_store.settings import ModelSettings
from model_store.store import (
    ArtifactRejected,
    LoadedModel,
    Manifest,
    ModelNotFound,
    ModelStore,
    ModelStoreError,
    StoreChanges,
)

__all__ = [
    "ArtifactRejected",
    "LoadedModel",
    "Manifest",
    "ModelNotFound",
    "ModelSettings",
    "ModelStore",
    "ModelStoreError",
    "StoreChanges",
]
