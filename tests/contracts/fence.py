"""Pins on a dependency's private names and code, and the check that names what to re-check.

A ``Fence`` is one dependency's table: the version it was read from and one ``Pin`` per name
the gateway overrides, copies, calls, reads or relies on. A pin names the dependency's object
(``module`` and a dotted ``name`` in it), the code of ours that relies on it (``uses``:
``"server:GatewayHttpProtocol.deliver"`` is ``GatewayHttpProtocol.deliver`` in
``gateway/server.py``), and what is pinned about it:

* ``digest``: the first 12 hex digits of the SHA-256 of its source (``inspect.getsource``), for
  code we override, replace, copy or whose behaviour we rely on;
* ``signature``: its parameter names (``params_of``: ``"self, url, **kwargs"``), for a callable
  we only call, or whose parameters we pass;
* neither: the name must exist (a private attribute read, a name imported from an internal
  module).

``check(fence)`` returns one message per pin that no longer holds, naming what changed, the
version pinned and the one installed, and the code of ours to re-check. ``modules`` stands in
for the check's own imports (a simulated release in a test).

After a bump: for each message, read the dependency's new code against ours and fix ours if
needed; then paste the digest (or signature) the message gives into the pin's row, and the new
version into the fence's ``version``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from typing import Any

__all__ = ["Fence", "Pin", "check", "digest_of", "ours", "params_of", "pin", "report", "resolve",
           "resolve_use"]

_DIGEST_CHARS = 12


@dataclass(frozen=True)
class Pin:
    """One relied-on name of a dependency; see the module docstring."""

    module: str
    name: str
    uses: tuple[str, ...]
    digest: str | None = None
    signature: str | None = None


def pin(module: str, name: str, digest: str | None, *uses: str,
        signature: str | None = None) -> Pin:
    """A table row: ``pin(module, name, digest, *uses)`` (digest None: existence or
    signature only)."""
    if not uses:
        raise ValueError(f"pin {module}:{name} names none of our code")
    return Pin(module, name, uses, digest, signature)


@dataclass(frozen=True)
class Fence:
    """One dependency's table: the distribution's name, the version the pins were read from,
    the file holding the table (named in messages), and its pins."""

    dependency: str
    version: str
    table: str
    pins: tuple[Pin, ...]


def resolve(module: str, name: str, modules: Mapping[str, Any] | None = None) -> Any:
    """The object ``name`` (dotted) in ``module`` (from ``modules`` if there).

    Raises:
        LookupError: the module or a part of the name is not there.
    """
    try:
        obj = modules[module] if modules is not None and module in modules \
            else importlib.import_module(module)
    except ImportError as exc:
        raise LookupError(f"module {module} cannot be imported ({exc})") from exc
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LookupError(f"{part!r} is not there") from None
    return obj


def _code(obj: Any) -> Any:
    """The function behind a property or cached property (else ``obj``)."""
    if isinstance(obj, property):
        return obj.fget
    if isinstance(obj, functools.cached_property):
        return obj.func
    return obj


def digest_of(obj: Any) -> str:
    """The pin digest of ``obj``'s source."""
    source = inspect.getsource(_code(obj))
    return hashlib.sha256(source.encode()).hexdigest()[:_DIGEST_CHARS]


def params_of(obj: Any) -> str:
    """``obj``'s parameter names, ``*args`` and ``**kwargs`` marked (annotations and defaults
    left out: a reformatted annotation is no change to us)."""
    marks = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return ", ".join(marks.get(p.kind, "") + p.name
                     for p in inspect.signature(_code(obj)).parameters.values())


def resolve_use(use: str) -> Any:
    """Our code named by a pin's use (``"server:GatewayHttpProtocol.deliver"``)."""
    module, _, name = use.partition(":")
    return resolve(f"gateway.{module}", name)


def ours(uses: tuple[str, ...]) -> str:
    """``uses`` for a reader: the names, grouped by file (``A.b, C in gateway/server.py``)."""
    by_file: dict[str, list[str]] = {}
    for use in uses:
        module, _, name = use.partition(":")
        by_file.setdefault(f"gateway/{module.replace('.', '/')}.py", []).append(name)
    return "; ".join(f"{', '.join(names)} in {path}" for path, names in by_file.items())


def check(fence: Fence, modules: Mapping[str, Any] | None = None) -> list[str]:
    """One message per pin of ``fence`` that no longer holds (see the module docstring)."""
    try:
        now = installed_version(fence.dependency)
    except PackageNotFoundError:  # the imports below will say more
        now = "not installed"
    read = f"read from {fence.dependency} {fence.version}, installed {now}"
    problems = []
    for p in fence.pins:
        what = f"{fence.dependency} {p.name}"
        recheck = f"re-check {ours(p.uses)}"
        try:
            obj = resolve(p.module, p.name, modules)
        except LookupError as exc:
            problems.append(f"{what} is gone from {p.module}: {exc} ({read}): {recheck}, then "
                            f"update or remove its row in {fence.table}")
            continue
        if p.signature is not None:
            try:
                sig = params_of(obj)
            except (TypeError, ValueError) as exc:
                sig = f"<none: {exc}>"
            if sig != p.signature:
                problems.append(f"{what} changed its parameters from ({p.signature}) to ({sig}) "
                                f"({read}): {recheck}, then set its signature to {sig!r} in "
                                f"{fence.table}")
        if p.digest is not None:
            try:
                got = digest_of(obj)
            except (OSError, TypeError) as exc:
                problems.append(f"{what} is no longer Python code whose source can be read "
                                f"({exc}; {read}): {recheck}, then update its row in "
                                f"{fence.table}")
                continue
            if got != p.digest:
                problems.append(f"{what} changed (digest {p.digest} {read}, now {got}): "
                                f"{recheck}, then set its digest to {got!r} in {fence.table}")
    return problems


def report(problems: list[str]) -> str:
    """The failure text for ``problems``: one per paragraph."""
    return f"{len(problems)} pin(s) no longer hold:\n\n" + "\n\n".join(problems)
