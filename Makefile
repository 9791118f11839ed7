# Inference gateway: `make run` serves the demo model, `make test` runs the whole suite.

PYTHON  ?= python3
VENV    ?= .venv
HOST    ?= 127.0.0.1
PORT    ?= 8000
WORKERS ?= 1
MODELS  ?= models

BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install run test lint bench bench-replicas models clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

models: install
	$(BIN)/python -m model_store --root $(MODELS) train-demo --if-empty

run: models
	GATEWAY_MODEL_ROOT=$(MODELS) $(BIN)/python -m gateway --host $(HOST) --port $(PORT) --workers $(WORKERS)

test: install
	@scripts/ensure-tools.sh redis-server wrk nginx
	$(BIN)/python -m pytest

# Side-by-side load test of the gateway configurations; BENCH_ARGS=--quick for a short run.
bench: models
	@scripts/ensure-tools.sh redis-server wrk
	$(BIN)/python -m bench --model-root $(MODELS) $(BENCH_ARGS)

# The nginx hop's cost: one gateway direct vs nginx + 1 vs nginx + 2 gateways, same wrk load.
bench-replicas: install
	@scripts/ensure-tools.sh wrk nginx
	$(BIN)/python -m bench.replicas $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check gateway model_store bench tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
