# Inference gateway: `make run` serves the demo model, `make test` runs the whole suite.

PYTHON  ?= python3
VENV    ?= .venv
HOST    ?= 127.0.0.1
PORT    ?= 8000
WORKERS ?= 1
MODELS  ?= models

BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# `make run` serves from an environment of its own with the runtime dependencies only.
RUN_VENV  ?= .venv-run
RUN_BIN   := $(RUN_VENV)/bin
RUN_STAMP := $(RUN_VENV)/.installed

.PHONY: install install-runtime lock proto run test test-fast lint bench bench-replicas models clean

install: $(STAMP)

install-runtime: $(RUN_STAMP)

# The environment is requirements/dev.lock: every distribution at its pinned version, checked
# against its hashes, nothing resolved here. Then the project itself, editable, built by the
# locked setuptools (no build isolation, so nothing unlocked is fetched).
$(STAMP): requirements/dev.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The same from requirements/runtime.lock: what the image installs, without tests, bench or lint.
$(RUN_STAMP): requirements/runtime.lock pyproject.toml
	@test -x $(RUN_BIN)/python || $(PYTHON) -m venv $(RUN_VENV)
	$(RUN_BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/runtime.lock
	$(RUN_BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(RUN_STAMP)

# Both locks from pyproject.toml, for CPython 3.11 on Linux x86_64, with hashes; pins already in
# a lock stay unless LOCK_ARGS says otherwise (--upgrade, or --upgrade-package NAME).
# uv (`uv pip compile`) rather than pip-tools: it resolves for a target Python and platform, not
# for the interpreter it runs on, without building or installing anything, and in seconds.
# dev.lock: the package with its dev extra (tests, bench, lint, uv). runtime.lock: what serving
# needs (the image, make run): the runtime dependencies, the booster and tracing extras, constrained by
# dev.lock so both pin the same versions. Both also lock [build-system] requires, as make install
# and the image build the project with them.
UV_COMPILE     = $(BIN)/uv pip compile --quiet --generate-hashes --no-strip-markers \
                 --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
                 --custom-compile-command 'make lock' $(LOCK_ARGS)
BUILD_REQUIRES = $(BIN)/python -c 'import tomllib; \
                 print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'

lock: install
	$(BUILD_REQUIRES) | $(UV_COMPILE) pyproject.toml - --extra dev -o requirements/dev.lock
	$(BUILD_REQUIRES) | $(UV_COMPILE) pyproject.toml - --extra xgboost --extra lightgbm --extra compile --extra tracing \
		-c requirements/dev.lock -o requirements/runtime.lock

# The Open Inference Protocol's gRPC stubs (messages, their type stubs, the service), generated
# from gateway/protocols/proto/grpc_service.proto by the locked grpcio-tools and committed.
# The messages go to a descriptor pool of their own (POOL), not protobuf's default one: other
# modules of package `inference` (tritonclient.grpc's) can then be imported in the same process.
PROTO_DIR := gateway/protocols/proto
proto: install
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		$(PROTO_DIR)/grpc_service.proto
	sed -i 's/^DESCRIPTOR = _descriptor_pool.Default()\.AddSerializedFile(/POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile(/' \
		$(PROTO_DIR)/grpc_service_pb2.py
	grep -q '^POOL = ' $(PROTO_DIR)/grpc_service_pb2.py

models: install
	$(BIN)/python -m model_store --root $(MODELS) train-demo --if-absent

run: install-runtime
	$(RUN_BIN)/python -m model_store --root $(MODELS) train-demo --if-absent
	GATEWAY_MODEL_ROOT=$(MODELS) $(RUN_BIN)/python -m gateway --host $(HOST) --port $(PORT) --workers $(WORKERS)

# Two pytest workers (most end-to-end tests wait on the processes they start); the tests of one
# file stay on one worker, with their module's fixtures.
test: install
	@scripts/ensure-tools.sh redis-server wrk nginx cc h2load
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The suite less what starts processes or takes long (e2e and slow tests).
test-fast: install
	$(BIN)/python -m pytest -m "not e2e and not slow" -p no:randomly

# Side-by-side load test of the gateway configurations; BENCH_ARGS=--quick for a short run.
bench: models
	@scripts/ensure-tools.sh redis-server wrk h2load
	$(BIN)/python -m bench --model-root $(MODELS) $(BENCH_ARGS)

# Workers or replicas: 1 worker, 2 workers, nginx + 1 and nginx + 2 gateways, same wrk loads.
bench-replicas: install
	@scripts/ensure-tools.sh wrk nginx
	$(BIN)/python -m bench.replicas $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check gateway model_store bench tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(RUN_VENV) build *.egg-info
