# syntax=docker/dockerfile:1
# The gateway: the runtime dependencies exactly as requirements/runtime.lock pins them (hashes
# checked; no dev or bench extras) in a venv at /opt/venv, then the project with `pip install .
# --no-deps`, run as an unprivileged user. The model store is a volume at /models; settings are
# GATEWAY_* environment variables. Ports: 8000 (HTTP) and 8001 (gRPC, when GATEWAY_GRPC_PORT=8001
# and GATEWAY_GRPC_HOST=0.0.0.0 turn it on: off by default, as in the gateway).
#
# The booster families (XGBoost, LightGBM, their compiled candidates) are served by whatever the
# lock pins: the image carries the system library they need (libgomp1, LightGBM's OpenMP
# runtime) either way, and the Python packages once runtime.lock includes the extras xgboost,
# lightgbm and compile.
#
#   docker build -t inference-gateway:0.1.0 .    python:3.11-slim, packages from the index
#   scripts/image.sh                             a Debian 12 base made with debootstrap and a
#                                                wheelhouse: no image registry, no index
#
# BASE: the base image. One without python3 (a bare Debian 12) gets Debian's python3 (3.11,
# as the lock) and python3-venv with apt-get. WHEELS: when set (to anything), the locked
# packages come from the build context's build/wheelhouse/ (`pip download` of the lock, see
# scripts/image.sh) with no index; hashes are checked against the lock either way.
ARG BASE=python:3.11-slim

# The wheelhouse's wheels if the context has any (the glob then matches nothing; the lock keeps
# the COPY from having no source): mounted where pip runs, never a layer of the image.
FROM scratch AS wheels
COPY requirements/runtime.lock build/wheelhous[e] /

FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Debian's packages are whatever bookworm ships: their versions are the release's, not pinned
# here. libgomp1: LightGBM loads the system's OpenMP runtime (libgomp.so.1).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && if ! command -v python3 >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends python3 python3-venv; \
    fi \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway \
 && mkdir /models \
 && chown 10001:10001 /models

ARG WHEELS=
WORKDIR /src
COPY requirements/runtime.lock ./requirements/
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -n "$WHEELS" ] && ! ls /wheels/*.whl >/dev/null 2>&1; then \
        echo "WHEELS is set but the build context has no build/wheelhouse/*.whl" >&2; exit 1; \
    fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps ${WHEELS:+--no-index --find-links /wheels} \
        -r requirements/runtime.lock
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY model_store ./model_store
# Built by the locked setuptools already in the venv: nothing is fetched.
RUN pip install . --no-deps --no-build-isolation --no-index \
 && rm -rf /src

WORKDIR /
USER 10001:10001
ENV GATEWAY_MODEL_ROOT=/models
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["python", "-m", "gateway", "--host", "0.0.0.0", "--port", "8000"]
