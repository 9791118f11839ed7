"""Per-model settings: serving knobs a model version carries in its manifest.

Each field overrides the gateway's global setting of the same name for that version only; a
field left unset (None) means "the global default". Ranges are those of the gateway's own
settings, so a manifest can never ask for what the gateway would refuse. ``threads`` has no
global counterpart: it is the thread count inside one call of an XGBoost or LightGBM model
(unset: 1; see ``model_store.boosters``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Execution", "ModelSettings"]

Execution = Literal["auto", "inline", "thread"]

# field -> (lowest, highest) for the integer fields; None = unbounded above
_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "max_batch_size": (1, 65536),
    "max_batch_delay_us": (0, 1_000_000),
    "infer_concurrency": (1, 64),
    "cache_ttl_s": (1, None),
    "threads": (1, 64),
}
_EXECUTIONS = ("auto", "inline", "thread")


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Serving settings of one model version; None = the gateway's global default.

    Raises ValueError on construction when a value is out of range or of the wrong type.
    """

    max_batch_size: int | None = None
    """Most rows in one model call (1..65536)."""

    max_batch_delay_us: int | None = None
    """How long a dispatch may wait for its batch to fill, microseconds (0..1,000,000)."""

    infer_concurrency: int | None = None
    """Model calls running at once for this version (1..64)."""

    cache_ttl_s: int | None = None
    """Redis entry lifetime of this version's answers, seconds (>= 1)."""

    execution: Execution | None = None
    """Where calls run: ``auto`` (inline when measured tiny), ``inline`` or ``thread``."""

    threads: int | None = None
    """Threads inside one model call of an XGBoost (``nthread``) or LightGBM
    (``num_threads``) model (1..64; unset: 1, which leaves the event loop its core)."""

    def __post_init__(self) -> None:
        for name, (lo, hi) in _INT_RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
            if value < lo or (hi is not None and value > hi):
                bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                raise ValueError(f"{name}: {value} is out of range ({bound})")
        if self.execution is not None and self.execution not in _EXECUTIONS:
            raise ValueError(f"execution: expected one of {', '.join(_EXECUTIONS)}, "
                             f"got {self.execution!r}")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """Every setting's name."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ModelSettings:
        """Settings from a manifest's ``settings`` object. Raises ValueError on an unknown
        name or a bad value."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"settings: expected an object, got {data!r}")
        unknown = sorted(set(data) - set(cls.fields()))
        if unknown:
            raise ValueError(f"settings: unknown {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(cls.fields())}")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        """Only the fields that are set."""
        return {k: v for k in self.fields() if (v := getattr(self, k)) is not None}

    def updated(self, values: Mapping[str, Any], unset: tuple[str, ...] = ()) -> ModelSettings:
        """A copy with ``values`` set and the fields named in ``unset`` back to the default.
        Raises ValueError on an unknown name or a bad value."""
        data = self.to_json()
        for name in unset:
            if name not in self.fields():
                raise ValueError(f"settings: unknown {name!r}; known: {', '.join(self.fields())}")
            data.pop(name, None)
        data.update(values)
        return self.from_json(data)

    def __bool__(self) -> bool:
        """True when at least one field is set."""
        return bool(self.to_json())
