# syntax=docker/dockerfile:1
# The gateway: python:3.11-slim, the runtime dependencies exactly as requirements/runtime.lock
# pins them (hashes checked; no dev or bench extras), then the project with `pip install .
# --no-deps`, run as an unprivileged user. The model store is a volume at /models; settings are
# GATEWAY_* environment variables. Build: docker build -t inference-gateway:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY requirements/runtime.lock ./requirements/
RUN pip install --require-hashes --no-deps -r requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY model_store ./model_store
RUN pip install . --no-deps --no-build-isolation \
 && cd / && rm -rf /src \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway \
 && mkdir /models \
 && chown 10001:10001 /models

WORKDIR /
USER 10001:10001
ENV GATEWAY_MODEL_ROOT=/models
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["python", "-m", "gateway", "--host", "0.0.0.0", "--port", "8000"]
