"""MLServer as the bench's baseline, serving the very model files the gateway serves.

``python -m bench --mlserver`` (or ``baseline`` here) starts a real MLServer on free loopback
ports with its own runtimes (``mlserver_lightgbm.LightGBMModel``, ``mlserver_xgboost.
XGBoostModel``) pointed at the native booster files of the gateway's store (their manifests say
where, and which family), or, for a scikit-learn model (the Iris demo), ``bench.mlserver_sklearn``
(``mlserver-sklearn``'s default behaviour) on the store's joblib file once its sha256 matches the
manifest's, adaptive batching on (``max_batch_size`` 64, ``max_batch_time``
2 ms by default), and ``debug`` off (no access log, as the gateway is run). Everything else is
MLServer's default: one parallel inference worker process, and each library's own default of
threads (one per core).

MLServer cannot share the gateway's environment (it pins ``fastapi<0.116``), so it runs from a
virtualenv of its own, installed once from ``bench/mlserver.lock`` (hashes checked, no
resolution; compiled from ``bench/mlserver.in``, which names the gateway's own versions of the
model libraries) under ``~/.cache/inference-gateway/mlserver-<lock digest>`` (or
``$XDG_CACHE_HOME``). A changed lock gets a new virtualenv.

The started server answers REST on ``url`` and the Open Inference Protocol over gRPC on
``MLServerProcess.grpc`` (the port its ``settings.json`` was given).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import GatewayProcess, mlserver_process
from model_store import ModelStore
from model_store.store import sha256_file

__all__ = ["LOCK", "RUNTIMES", "MLServerProcess", "baseline", "default_venv", "ensure_venv",
           "write_repository"]

LOCK = Path(__file__).with_name("mlserver.lock")
_SKLEARN_RUNTIME = Path(__file__).with_name("mlserver_sklearn.py")
_SKLEARN_MODULE = "bench_sklearn_runtime"  # its name beside the model's settings
RUNTIMES = {"lightgbm": "mlserver_lightgbm.LightGBMModel",
            "xgboost": "mlserver_xgboost.XGBoostModel",
            "sklearn": f"{_SKLEARN_MODULE}.SKLearnModel"}
"""MLServer's runtime for each model family it serves here."""
_INSTALLED = ".bench-installed"  # written into the virtualenv once the lock is installed


def default_venv() -> Path:
    """Where the baseline's virtualenv lives: one per version of the lock."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]
    return cache / "inference-gateway" / f"mlserver-{digest}"


def ensure_venv(venv: Path | None = None) -> Path:
    """The ``mlserver`` executable of ``venv`` (default ``default_venv()``), installed from
    the lock first when it is not there yet (a few minutes, once). A virtualenv left half
    installed is made again; a non-empty directory that is not a virtualenv is refused
    (RuntimeError)."""
    venv = venv or default_venv()
    exe = venv / "bin" / "mlserver"
    if (venv / _INSTALLED).is_file() and exe.is_file():
        return exe
    if (venv / "pyvenv.cfg").is_file():  # a partial install of ours
        shutil.rmtree(venv)
    elif venv.exists() and any(venv.iterdir()):
        raise RuntimeError(f"{venv}: not empty and not a virtualenv; refusing to install there")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--require-hashes", "--no-deps", "-r", str(LOCK)], check=True)
    (venv / _INSTALLED).write_text(hashlib.sha256(LOCK.read_bytes()).hexdigest() + "\n")
    return exe


def write_repository(directory: Path, store_root: Path, models: Sequence[str], *,
                     max_batch_size: int = 64, max_batch_time_s: float = 0.002
                     ) -> dict[str, Path]:
    """One MLServer model directory per model under ``directory``: a ``model-settings.json``
    whose ``uri`` is the artifact of the model's latest version in the store at
    ``store_root`` (not a copy). Returns each model's artifact path.

    Raises ValueError for a model MLServer has no runtime for here (a pickled booster), or a
    scikit-learn pickle whose sha256 is not its manifest's.
    """
    store = ModelStore(store_root)
    artifacts = {}
    for name in models:
        version = store.latest(name)
        manifest = store.manifest(name, version)
        sklearn = manifest.family == "sklearn"
        if manifest.family not in RUNTIMES or (manifest.format == "joblib") != sklearn:
            raise ValueError(f"{name}: MLServer serves scikit-learn pickles and native XGBoost "
                             f"and LightGBM files here, not a {manifest.family} "
                             f"{manifest.format} artifact")
        artifact = (store.root / name / str(version) / manifest.artifact).resolve()
        if sklearn and sha256_file(artifact) != manifest.sha256:
            raise ValueError(f"{name}: {artifact} does not match its manifest's sha256")
        settings: dict[str, Any] = {
            "name": name, "implementation": RUNTIMES[manifest.family],
            "parameters": {"uri": str(artifact), "version": str(version)},
            "max_batch_size": max_batch_size, "max_batch_time": max_batch_time_s,
        }
        (directory / name).mkdir(parents=True, exist_ok=True)
        (directory / name / "model-settings.json").write_text(json.dumps(settings, indent=2))
        if sklearn:
            shutil.copyfile(_SKLEARN_RUNTIME, directory / name / f"{_SKLEARN_MODULE}.py")
        artifacts[name] = artifact
    return artifacts


@dataclass
class MLServerProcess(GatewayProcess):
    """A started MLServer: its REST server as a ``GatewayProcess``, and its gRPC port."""

    grpc_port: int = 0

    @property
    def grpc(self) -> str:
        """``host:port`` of its gRPC service."""
        return f"127.0.0.1:{self.grpc_port}"


@contextmanager
def baseline(store_root: Path, models: Sequence[str], *, venv: Path | None = None,
             max_batch_size: int = 64, max_batch_time_s: float = 0.002,
             timeout_s: float = 120) -> Iterator[MLServerProcess]:
    """A started MLServer serving ``models`` from the store at ``store_root`` on free
    loopback ports (REST, gRPC, metrics); yielded once every model is loaded and its HTTP
    server listens, stopped (SIGTERM, by PID) when the context ends."""
    exe = ensure_venv(venv)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlserver-")))
        write_repository(work, store_root, models, max_batch_size=max_batch_size,
                         max_batch_time_s=max_batch_time_s)
        svc = stack.enter_context(mlserver_process(exe, work, models, timeout_s=timeout_s))
        grpc_port = int(json.loads((work / "settings.json").read_text())["grpc_port"])
        yield MLServerProcess(svc.process, svc.port, svc.uds, grpc_port=grpc_port)
