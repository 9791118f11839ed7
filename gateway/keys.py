"""Canonical cache keys: ``prefix:model:version-digest:hash``.

The hash is blake2b-128 over the row as float64 little-endian bytes in the manifest's feature
order (``-0.0`` folded to ``0.0``), followed by one byte for what is asked (labels or
probabilities). So ``5.1`` and ``5.10``, or a row given as a list or as an object, share a key;
a new model version (new artifact digest) never shares one with an old version.
"""

from __future__ import annotations

from hashlib import blake2b

import numpy as np

__all__ = ["canonical_rows", "row_keys"]

_LABEL = b"L"
_PROBA = b"P"


def canonical_rows(rows: np.ndarray) -> np.ndarray:
    """``rows`` as a C-contiguous little-endian float64 matrix with ``-0.0`` folded to ``0.0``."""
    out = np.ascontiguousarray(rows, dtype="<f8")
    return out + 0.0  # IEEE 754: -0.0 + 0.0 == +0.0; also copies, so callers keep theirs


def row_keys(prefix: str, model: str, digest: str, rows: np.ndarray, proba: bool) -> list[str]:
    """One key per row of the canonical matrix ``rows`` (see ``canonical_rows``)."""
    tag = _PROBA if proba else _LABEL
    head = f"{prefix}:{model}:{digest}:"
    return [
        head + blake2b(row.tobytes() + tag, digest_size=16).hexdigest() for row in rows
    ]
