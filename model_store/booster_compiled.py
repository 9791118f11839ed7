"""Compiled candidates for an XGBoost or LightGBM model, verified per output, measured, chosen.

A booster model has up to three candidate backends:

* ``onnx``: the booster converted by onnxmltools and run by onnxruntime. The ONNX-ML tree
  operators take float32 rows: exact for XGBoost, which rounds its input to float32 itself;
  for LightGBM, which compares float64 rows with float64 thresholds, rows within a float32
  step of a threshold can change sides, and verification says so.
* ``treelite``: the booster read by Treelite, turned into C by TL2cgen (``parallel_comp``
  translation units) and compiled by the machine's C compiler (``$CC``, else ``cc``; ``-O1``,
  one compiler per core) into a shared library, run by TL2cgen's predictor. Thresholds keep
  the library's type (float32 for XGBoost, float64 for LightGBM); a LightGBM model's rows get
  its reading of values within 1e-35 of zero as zero.
* the library itself (``xgboost``, ``lightgbm``): ``BoosterModel`` (``inplace_predict`` /
  ``predict``), the fallback that always serves.

Every candidate runs with the version's ``threads`` (1 unless set; see ``booster_threads``),
and its answers are shaped by ``BoosterAnswers`` from what it computes, as the library's are.

**Building** (``build``). The ONNX conversion runs in-process. The Treelite build runs in a
child process (``model_store.child``) with a time limit (``timeout_s``): Treelite parses the
model file itself, and the compiler may take minutes on a large model; a crash, a compiler
error or the time limit refuses the candidate with its reason, never the registration.

**Verification** is ``compiled.verify_backend`` against the library's own predict on the
verification rows, per output (labels exactly, probabilities within ``proba_atol``, values
within ``value_rtol``). A model with categorical splits (LightGBM) gets no compiled candidate:
the generated rows do not exercise those splits.

**Measurement** (``measure``): each verified candidate and the library, one call of 1 row and
one of 64 rows, in ``rounds`` interleaved rounds (a round times each backend in turn, so a
change of the machine's load falls on all of them); each round keeps the median of its calls,
and the figure is the median of the rounds with their minimum and maximum.

**Choice** (``choose``): per output, the backend with the least ``t(1) + t(64)`` among the
library and the candidates verified for that output. The library keeps an output no candidate
verifies.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from model_store import child
from model_store.boosters import ARTIFACTS, BoosterAnswers, BoosterInfo, Format, read_native
from model_store.compiled import Expected, OutputCheck, verify_backend

__all__ = [
    "CANDIDATES",
    "RULE",
    "SIZES",
    "BuildError",
    "Built",
    "Candidate",
    "OnnxBooster",
    "Outcome",
    "TreeliteBooster",
    "artifact_name",
    "build",
    "build_treelite",
    "choose",
    "compile_booster",
    "load_candidate",
    "measure",
    "score_us",
    "verify",
]

Candidate = Literal["onnx", "treelite"]
CANDIDATES: tuple[Candidate, ...] = ("onnx", "treelite")
SIZES = (1, 64)
"""Rows per measured call."""
RULE = "per output, the least t(1) + t(64) among the library and the candidates verified for it"

_SUFFIX = {"onnx": ".onnx", "treelite": ".so"}
_FLAGS = ("-O1", "-fPIC", "-std=c99")
_TREES_PER_UNIT = 10  # trees per C file: smaller files take the compiler less time in all
_MAX_UNITS = 64
_ONNX_OPSET = 15  # the newest onnxmltools 1.16 converts to
_LGB_ZERO = float(np.float32(1e-35))
"""LightGBM's kZeroThreshold: a dense row's value within it is read as 0, so a split at
-kZeroThreshold (LightGBM's split between negatives and zeros) sends it right."""


class BuildError(ValueError):
    """A candidate cannot be built or loaded; the message is one line."""


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise BuildError(f"{name} is not installed (pip install "
                         "'inference-gateway[compile]')") from None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def artifact_name(candidate: str, data: bytes) -> str:
    """The artifact's file name in a version directory: content-addressed, so recompiling
    never rewrites a file a running gateway has open or mapped."""
    return f"compiled-{hashlib.sha256(data).hexdigest()[:16]}{_SUFFIX[candidate]}"


# -- ONNX ------------------------------------------------------------------------------------------
def _onnx_bytes(booster: Any, info: BoosterInfo) -> bytes:
    """The booster converted by onnxmltools, its outputs' shapes left open."""
    tools = _module("onnxmltools")
    types = importlib.import_module("onnxmltools.convert.common.data_types")
    initial = [("input", types.FloatTensorType([None, info.n_features]))]
    try:
        if info.family == "xgboost":
            plain = booster.copy()  # the converter reads splits as f<index>: no feature names
            plain.feature_names = None
            plain.feature_types = None
            onx = tools.convert_xgboost(plain, initial_types=initial, target_opset=_ONNX_OPSET)
        else:
            onx = tools.convert_lightgbm(booster, initial_types=initial,
                                         target_opset=_ONNX_OPSET, zipmap=False)
    except Exception as exc:  # the converters' errors are not typed; named in the message
        raise BuildError(f"onnxmltools cannot convert it: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from exc
    for output in onx.graph.output:  # some converters declare a batch of 1
        dims = output.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value"):
            dims[0].dim_param = "N"
    data: bytes = onx.SerializeToString()
    return data


class OnnxBooster(BoosterAnswers):
    """The ONNX candidate: float32 rows in; its probabilities (or value) output is the raw
    output ``BoosterAnswers`` shapes (onnxmltools gives ``multi:softmax`` margins there)."""

    def __init__(self, data: bytes, info: BoosterInfo, classes: Iterable[Any] | None, *,
                 threads: int = 1) -> None:
        super().__init__(info, classes)
        ort = _module("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(data, sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors on load
            raise BuildError(f"onnxruntime cannot load it: {_first_line(exc)}") from exc
        names = [o.name for o in self._session.get_outputs()]
        wanted = "probabilities" if info.task == "classification" else names[0]
        if wanted not in names:
            raise BuildError(f"the ONNX model has no {wanted} output ({', '.join(names)})")
        self._outputs = [wanted]
        self._input = self._session.get_inputs()[0].name

    def _raw(self, rows: np.ndarray) -> np.ndarray:
        (out,) = self._session.run(self._outputs,
                                   {self._input: np.ascontiguousarray(rows, dtype=np.float32)})
        raw = np.asarray(out)
        return raw[:, 1] if self._binary else raw


# -- Treelite and TL2cgen --------------------------------------------------------------------------
def build_treelite(path: str, format: str, out: str, iteration_range: list[int],
                   compiler: str, jobs: int) -> dict[str, Any]:
    """A child process's task (``model_store.child``): the booster file at ``path`` read by
    Treelite, its C code generated by TL2cgen under ``out`` and compiled with ``compiler``,
    ``jobs`` at a time, into ``out/predictor.so``. Returns the library's path and the number of
    C files. Raises BuildError (BoosterError for the file)."""
    booster, info = read_native(Path(path).read_bytes(), format)  # type: ignore[arg-type]
    treelite, tl2cgen = _module("treelite"), _module("tl2cgen")
    start, stop = iteration_range
    if info.family == "xgboost" and stop:
        booster = booster[start:stop]
    try:
        if info.family == "xgboost":
            model = treelite.frontend.from_xgboost(booster)
        else:
            model = treelite.frontend.from_lightgbm(booster)
        units = max(1, min(_MAX_UNITS, int(model.num_tree) // _TREES_PER_UNIT))
        src = Path(out) / "src"
        tl2cgen.generate_c_code(model, dirpath=str(src), params={"parallel_comp": units})
    except (treelite.TreeliteError, tl2cgen.TL2cgenError) as exc:
        raise BuildError(f"treelite: {_first_line(exc)}") from exc
    sources = sorted(src.glob("*.c"))
    _compile_all(compiler, sources, max(1, jobs))
    library = Path(out) / "predictor.so"
    _compiler_run([compiler, "-shared", "-o", str(library),
                   *(str(s.with_suffix(".o")) for s in sources), "-lm"])
    return {"library": str(library), "sources": len(sources)}


def _compile_all(compiler: str, sources: list[Path], jobs: int) -> None:
    """Each C file to an object file, at most ``jobs`` compilers at once. Raises BuildError."""
    running: list[subprocess.Popen[bytes]] = []
    pending = list(sources)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                s = pending.pop(0)
                running.append(subprocess.Popen(
                    [compiler, "-c", *_FLAGS, "-o", str(s.with_suffix(".o")), str(s)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            proc = running.pop(0)
            _, err = proc.communicate()
            if proc.returncode:
                raise _failed(compiler, proc.returncode, err)
    finally:
        for proc in running:  # only after a failure
            proc.kill()
            proc.communicate()


def _compiler_run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if done.returncode:
        raise _failed(cmd[0], done.returncode, done.stderr)


def _failed(program: str, status: int, stderr: bytes) -> BuildError:
    said = _first_line(stderr.decode(errors="replace"))
    return BuildError(f"{program} failed (exit status {status})" + (f": {said}" if said else ""))


def _cores() -> int:
    """The cores this process may run on (compilers run at once)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def _compiler() -> tuple[str, str]:
    """The machine's C compiler (``$CC``, else ``cc``) and the first line of its version."""
    name = os.environ.get("CC") or "cc"
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"no C compiler: {name} is not on PATH")
    try:
        done = subprocess.run([path, "--version"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{name} --version failed: {exc}") from exc
    lines = done.stdout.decode(errors="replace").splitlines()
    return path, (lines[0].strip() if lines else name)


class TreeliteBooster(BoosterAnswers):
    """The Treelite candidate: a TL2cgen shared library, loaded from a private copy of the
    bytes the caller checked (the copy is removed once loaded; the library stays mapped).
    ``TL2cgenPredictorPredictBatch`` keeps no state between calls, so one predictor serves
    concurrent calls; it needs at least as many rows as threads, so smaller calls use a
    one-thread predictor."""

    def __init__(self, data: bytes, info: BoosterInfo, classes: Iterable[Any] | None, *,
                 threads: int = 1) -> None:
        super().__init__(info, classes)
        self._tl2cgen = _module("tl2cgen")
        self.threads = threads
        with tempfile.TemporaryDirectory(prefix="model-store-tl2cgen-") as tmp:
            lib = Path(tmp) / "predictor.so"
            lib.write_bytes(data)
            try:
                self._one = self._tl2cgen.Predictor(lib, nthread=1)
                self._many = (self._tl2cgen.Predictor(lib, nthread=threads) if threads > 1
                              else self._one)
            except self._tl2cgen.TL2cgenError as exc:
                raise BuildError(f"tl2cgen cannot load it: {_first_line(exc)}") from exc
        width = int(np.max(self._one.num_class))
        if self._one.num_feature != info.n_features or width != (
                info.n_classes if info.n_classes > 2 else 1):
            raise BuildError(f"the compiled library has {self._one.num_feature} features and "
                             f"{width} outputs, the model {info.n_features} and "
                             f"{info.n_classes} classes")
        self._dtype = np.float32 if self._one.threshold_type == "float32" else np.float64

    def _raw(self, rows: np.ndarray) -> np.ndarray:
        predictor = self._many if len(rows) >= self.threads else self._one
        if self.family == "lightgbm":  # as LightGBM reads dense rows: |x| <= 1e-35 is 0
            rows = np.where(np.abs(rows) <= _LGB_ZERO, 0.0, rows)
        matrix = self._tl2cgen.DMatrix(np.ascontiguousarray(rows, dtype=self._dtype))
        out = np.asarray(predictor.predict(matrix, pred_margin=self._softmax))
        if self.info.task == "classification" and not self._binary:
            return out.reshape(len(rows), -1)
        return out.reshape(len(rows))


# -- building, loading -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Built:
    """A candidate's artifact and what its build recorded (library versions, compiler...)."""

    candidate: Candidate
    data: bytes
    record: dict[str, Any] = field(default_factory=dict)


def build(candidate: Candidate, booster: Any, info: BoosterInfo, native: bytes, fmt: Format,
          *, iteration_range: tuple[int, int] = (0, 0), timeout_s: float = 600.0) -> Built:
    """Build ``candidate`` for the booster (``native``: its file, of ``fmt``; an XGBoost
    wrapper's trees limited to ``iteration_range``). Raises BuildError with the reason."""
    if info.categorical:
        raise BuildError("categorical splits: the verification rows do not exercise them")
    start = time.monotonic()
    if candidate == "onnx":
        if info.family == "xgboost" and iteration_range[1]:
            booster = booster[iteration_range[0]:iteration_range[1]]
        data = _onnx_bytes(booster, info)
        return Built("onnx", data, {
            "convert_s": round(time.monotonic() - start, 3),
            "library_versions": {"onnxmltools": _version("onnxmltools"),
                                 "onnxruntime": _version("onnxruntime")}})
    compiler, compiler_version = _compiler()
    with tempfile.TemporaryDirectory(prefix="model-store-tl2cgen-") as tmp:
        path = Path(tmp) / ARTIFACTS[fmt]
        path.write_bytes(native)
        try:
            answer = child.run("model_store.booster_compiled:build_treelite", {
                "path": str(path), "format": fmt, "out": tmp,
                "iteration_range": list(iteration_range), "compiler": compiler,
                "jobs": _cores()}, timeout_s=timeout_s)
            data = Path(answer["library"]).read_bytes()
        except child.ChildFailed as exc:
            raise BuildError(("the build " if exc.crashed or exc.timed_out else "") + str(exc)
                             ) from exc
        except (OSError, KeyError, TypeError) as exc:
            raise BuildError(f"the build left no library: {exc}") from exc
    return Built("treelite", data, {
        "compile_s": round(time.monotonic() - start, 1), "compiler": compiler_version,
        "flags": " ".join(_FLAGS), "sources": int(answer.get("sources", 0)),
        "library_versions": {"treelite": _version("treelite"), "tl2cgen": _version("tl2cgen")}})


def load_candidate(candidate: str, data: bytes, info: BoosterInfo,
                   classes: Iterable[Any] | None, *, threads: int = 1) -> BoosterAnswers:
    """A built candidate's artifact loaded, ready to answer. Raises BuildError."""
    if candidate == "onnx":
        return OnnxBooster(data, info, classes, threads=threads)
    if candidate == "treelite":
        return TreeliteBooster(data, info, classes, threads=threads)
    raise BuildError(f"unknown candidate {candidate!r}")


def verify(expected: Expected, model: BoosterAnswers, candidate: str, proba_atol: float,
           value_rtol: float) -> dict[str, OutputCheck]:
    """``compiled.verify_backend`` for a candidate, its reasons starting with its name."""
    return verify_backend(expected, model, proba_atol, value_rtol, candidate)


# -- the whole of it -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    """What ``compile_booster`` found: the artifacts of the chosen candidates (file name ->
    bytes, to write into the version directory), a record per candidate tried (for the
    manifest's ``backends``) and the choice (the manifest's ``choice``)."""

    files: dict[str, bytes]
    backends: dict[str, dict[str, Any]]
    choice: dict[str, Any]


def compile_booster(booster: Any, info: BoosterInfo, classes: Iterable[Any] | None,
                    native: bytes, fmt: Format, expected: Expected, *,
                    library: str, library_call: Callable[[np.ndarray], Any],
                    candidates: Iterable[Candidate] = CANDIDATES, required: bool = False,
                    threads: int = 1, iteration_range: tuple[int, int] = (0, 0),
                    proba_atol: float = 1e-6, value_rtol: float = 1e-5,
                    timeout_s: float = 600.0, rounds: int = 5) -> Outcome:
    """Build, verify (against ``expected``: the library's own answers on the verification
    rows), measure and choose (see the module docstring). ``library`` names the family and
    ``library_call`` is what serves it (both outputs). With ``required`` (one candidate asked
    for by name), a candidate that cannot be built raises BuildError, and it serves every
    output it verifies, whatever the measurement says."""
    outputs = ["label"] + (["probabilities"] if expected.proba is not None else [])
    backends: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, OutputCheck]] = {}
    models: dict[str, BoosterAnswers] = {}
    data: dict[str, bytes] = {}
    refused: dict[str, str] = {}
    for candidate in candidates:
        try:
            built = build(candidate, booster, info, native, fmt,
                          iteration_range=iteration_range, timeout_s=timeout_s)
            model = load_candidate(candidate, built.data, info, classes, threads=threads)
        except BuildError as exc:
            if required:
                raise
            backends[candidate] = {"error": str(exc)}
            refused[candidate] = str(exc)
            continue
        found = verify(expected, model, candidate, proba_atol, value_rtol)
        backends[candidate] = {**built.record, "bytes": len(built.data),
                               "checks": {o: c.to_json() for o, c in found.items()}}
        reasons = [c.reason for c in found.values() if not c.verified]
        if reasons:
            refused[candidate] = "; ".join(reasons)
        if len(reasons) < len(found):
            checks[candidate], models[candidate], data[candidate] = found, model, built.data
    measured = measure({library: library_call, **{c: m.run for c, m in models.items()}},
                       expected.rows, rounds=rounds)
    if required:
        chosen = {o: next((c for c in checks if checks[c][o].verified), library)
                  for o in outputs}
    else:
        chosen = choose(library, outputs, checks, measured)
    files = {}
    for picked in sorted(set(chosen.values()) - {library}):
        name = artifact_name(picked, data[picked])
        files[name] = data[picked]
        backends[picked].update(artifact=name, sha256=hashlib.sha256(data[picked]).hexdigest())
    choice = {"outputs": chosen, "rule": "asked for by name: it serves every output it "
              "verifies" if required else RULE, "threads": threads, "rounds": rounds,
              "measured": measured, "refused": refused}
    return Outcome(files, backends, choice)


# -- measuring, choosing ---------------------------------------------------------------------------
def measure(calls: Mapping[str, Callable[[np.ndarray], Any]], rows: np.ndarray, *,
            rounds: int = 5, budget_s: float = 0.02) -> dict[str, dict[str, dict[str, float]]]:
    """Per backend and row count (``"1"``, ``"64"``): ``median_us``, ``min_us``, ``max_us`` of
    one call over ``rounds`` interleaved rounds (see the module docstring); each round makes
    about ``budget_s`` worth of calls (3 to 50) per backend and size."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    blocks = {n: [rows[(i * n) % max(1, len(rows) - n):][:n] for i in range(8)] for n in SIZES}
    counts: dict[tuple[str, int], int] = {}
    for name, fn in calls.items():  # first calls pay for lazy set-up; they size the rounds
        for n in SIZES:
            start = time.perf_counter()
            fn(blocks[n][0])
            took = time.perf_counter() - start
            counts[name, n] = max(3, min(50, int(budget_s / max(took, 1e-7))))
    samples: dict[tuple[str, int], list[float]] = {k: [] for k in counts}
    for _ in range(rounds):
        for name, fn in calls.items():
            for n in SIZES:
                times = []
                for i in range(counts[name, n]):
                    x = blocks[n][i % len(blocks[n])]
                    start = time.perf_counter()
                    fn(x)
                    times.append(time.perf_counter() - start)
                samples[name, n].append(statistics.median(times) * 1e6)
    return {name: {str(n): {"median_us": round(statistics.median(samples[name, n]), 2),
                            "min_us": round(min(samples[name, n]), 2),
                            "max_us": round(max(samples[name, n]), 2)} for n in SIZES}
            for name in calls}


def score_us(measured: Mapping[str, Mapping[str, float]]) -> float:
    """What ``choose`` compares: the median of a 1-row call plus that of a 64-row call."""
    return sum(float(measured[str(n)]["median_us"]) for n in SIZES)


def choose(library: str, outputs: Iterable[str],
           checks: Mapping[str, Mapping[str, OutputCheck]],
           measured: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, str]:
    """Per output, the backend serving it (see the module docstring): ``library`` unless a
    candidate verified for that output (``checks[candidate][output]``) is measured faster; on
    a tie, the library."""
    chosen = {}
    for output in outputs:
        best, best_us = library, score_us(measured[library])
        for candidate, per_output in checks.items():
            check = per_output.get(output)
            if check is None or not check.verified or candidate not in measured:
                continue
            us = score_us(measured[candidate])
            if us < best_us:
                best, best_us = candidate, us
        chosen[output] = best
    return chosen


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else (type(exc).__name__ if isinstance(exc, BaseException)
                                       else "")

