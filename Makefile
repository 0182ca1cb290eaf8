# `make run` and `make test` each create .venv and install what they need, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Both the Makefile and the Dockerfile install from these files (tests/test_packaging.py checks it).
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run test lint typecheck unit monitoring-deps redis-deps browser-deps clean

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

# tests/test_redis_*.py and the store contract tests start their own redis-server (unless REDIS_URL
# names one); installed from Debian's redis-server package when missing, as above.
redis-deps:
	@if [ -z "$$REDIS_URL" ] && ! command -v redis-server >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; \
	fi

# tests/e2e/test_browser.py drives the playground in headless Chromium through chromedriver, both from
# Debian (chromium, chromium-driver), installed when either is missing, as above.
browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

unit: $(DEV_STAMP) monitoring-deps redis-deps browser-deps
	$(BIN)/pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
