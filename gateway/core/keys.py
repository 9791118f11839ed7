"""Canonical cache keys: ``prefix:model:version-digest:unit:hash``.

The hash is blake2b-128 over the row as float64 little-endian bytes in the manifest's feature
order (``-0.0`` folded to ``0.0``). ``unit`` names what is computed for the row and by which
backend (e.g. ``label@onnx``, ``both@sklearn``), so ``5.1`` and ``5.10``, or a row given as a
list or as an object, share a key, while a new model version (new artifact digest), another
output or another backend never does.
"""

from __future__ import annotations

from hashlib import blake2b

import numpy as np

__all__ = ["canonical_rows", "key_head", "row_keys"]


def canonical_rows(rows: np.ndarray) -> np.ndarray:
    """``rows`` as a C-contiguous little-endian float64 matrix with ``-0.0`` folded to ``0.0``."""
    out = np.ascontiguousarray(rows, dtype="<f8")
    return out + 0.0  # IEEE 754: -0.0 + 0.0 == +0.0; also copies, so callers keep theirs


def key_head(prefix: str, model: str, digest: str, unit: str) -> str:
    """Everything of a key but the row hash; computed once per model version and unit."""
    return f"{prefix}:{model}:{digest}:{unit}:"


def row_keys(head: str, rows: np.ndarray) -> list[str]:
    """One key per row of the canonical matrix ``rows`` (see ``canonical_rows``)."""
    data = rows.tobytes()
    width = rows.shape[1] * 8
    return [
        head + blake2b(data[i:i + width], digest_size=16).hexdigest()
        for i in range(0, len(data), width)
    ]
