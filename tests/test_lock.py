"""The environment is the lock, and the lock is pyproject.toml's.

``requirements/dev.lock`` (what ``make install`` installs) and ``requirements/runtime.lock``
(what the image installs) are written by ``make lock``. These tests fail, naming each
difference, when this environment does not hold exactly the dev lock's pins, when a lock no
longer satisfies pyproject.toml, and when a dependency whose private names the code uses has
no upper bound in pyproject.toml. Nothing is started and nothing is fetched.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEV_LOCK = ROOT / "requirements" / "dev.lock"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.lock"
FIX = "run `make install` (or `make lock` after changing pyproject.toml)"

PRIVATE_USE = {
    "uvicorn": "gateway/server.py",
    "redis": "gateway/redis_client.py, gateway/remote.py",
    "prometheus-client": "gateway/metrics.py",
    "scikit-learn": "model_store/compiled.py, model_store/forest.py",
    "skl2onnx": "model_store/compiled.py",
}
"""Distributions whose private names the code uses, and where: bounded above, re-checked (at
those places) before a bound is raised."""


def canonical(name: str) -> str:
    """The PEP 503 normal form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, Version]:
    """Canonical name -> pinned version of each ``name==version`` line of a lock whose
    environment marker, if any, holds for this interpreter. Comments, hashes and continuation
    lines are skipped; a line that is not such a pin is an error."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip() or raw[0].isspace() or raw.startswith(("#", "-")):
            continue  # blank, comment, hash or option
        pin, _, marker = raw.removesuffix("\\").partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)", pin.strip())
        assert match, f"{path.name}:{number}: not a `name==version` pin: {raw!r}"
        pins[canonical(match[1])] = Version(match[3])
    return pins


def installed() -> dict[str, Version]:
    """Canonical name -> version of every distribution this interpreter imports from (the
    first one found on sys.path, as import would)."""
    out: dict[str, Version] = {}
    for dist in importlib.metadata.distributions():
        out.setdefault(canonical(dist.metadata["Name"]), Version(dist.version))
    return out


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def requirements(*extras: str) -> list[Requirement]:
    """pyproject.toml's build requirements and dependencies, plus those of ``extras`` (and of
    the extras they name of this project), that apply to this interpreter."""
    data = pyproject()
    project = data["project"]
    names = list(data["build-system"]["requires"]) + list(project["dependencies"])
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in project["optional-dependencies"][extra]:
            requirement = Requirement(line)
            if canonical(requirement.name) == canonical(project["name"]):
                pending.extend(requirement.extras)
            else:
                names.append(line)
    out = [Requirement(line) for line in names]
    return [r for r in out if r.marker is None or r.marker.evaluate({"extra": ""})]


def test_every_locked_distribution_is_installed_at_its_pinned_version() -> None:
    locked, present = read_lock(DEV_LOCK), installed()
    assert locked, f"{DEV_LOCK.name} pins nothing"
    wrong = [
        f"{name}: locked {version}, "
        + (f"installed {present[name]}" if name in present else "not installed")
        for name, version in sorted(locked.items())
        if present.get(name) != version
    ]
    assert not wrong, f"this environment is not {DEV_LOCK.name}: " + "; ".join(wrong) + f". {FIX}"


def _unsatisfied(lock: Path, wanted: list[Requirement]) -> list[str]:
    pins = read_lock(lock)
    out = []
    for requirement in wanted:
        version = pins.get(canonical(requirement.name))
        if version is None:
            out.append(f"{lock.name} lacks {requirement}")
        elif not requirement.specifier.contains(version, prereleases=True):
            out.append(f"{lock.name} pins {requirement.name}=={version}, not {requirement}")
    return out


def test_the_locks_satisfy_pyproject() -> None:
    problems = (_unsatisfied(DEV_LOCK, requirements("dev"))
                + _unsatisfied(RUNTIME_LOCK, requirements()))
    assert not problems, "; ".join(problems) + ": run `make lock`"


def test_the_runtime_lock_pins_what_the_dev_lock_pins() -> None:
    dev, runtime = read_lock(DEV_LOCK), read_lock(RUNTIME_LOCK)
    differ = [f"{name}: runtime {version}, dev {dev.get(name, 'not locked')}"
              for name, version in sorted(runtime.items()) if dev.get(name) != version]
    assert not differ, "; ".join(differ) + ": run `make lock`"


def test_every_pin_has_a_hash() -> None:
    for lock in (DEV_LOCK, RUNTIME_LOCK):
        entries = re.split(r"\n(?=[^\s#])", lock.read_text())
        bare = [e.split()[0] for e in entries
                if e.strip() and not e.startswith("#") and "--hash=sha256:" not in e]
        assert not bare, f"{lock.name}: no hash for {', '.join(bare)}: run `make lock`"


def test_dependencies_whose_private_names_we_use_are_bounded_above() -> None:
    declared = {canonical(Requirement(line).name): Requirement(line)
                for line in pyproject()["project"]["dependencies"]}
    problems = []
    for name, where in PRIVATE_USE.items():
        requirement = declared.get(name)
        if requirement is None:
            problems.append(f"{name} is no longer a dependency: update PRIVATE_USE")
        elif not any(s.operator in ("<", "<=", "==", "~=", "===")
                     for s in requirement.specifier):
            problems.append(f"{requirement} has no upper bound (its private names are used in "
                            f"{where}: re-check them, then bound it below the next minor)")
    assert not problems, "; ".join(problems)
