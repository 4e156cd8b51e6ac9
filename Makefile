# make demo: set up and run the service against a local JupyterHub.  make test: set up and test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench schemas rabbitmq redis clean

setup: $(VENV)/.installed node_modules/.installed rabbitmq redis

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

node_modules/.installed: package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

rabbitmq:
	@scripts/ensure-rabbitmq

# The Celery bridge's tests: a Redis of their own on 127.0.0.1:6390 (TEST_REDIS_PORT).
redis:
	@scripts/ensure-redis

demo: setup
	$(PY) -m tests.support.demo

test: setup lint
	$(PY) -m pytest

# Lint, format check and types (configured in pyproject.toml); make test runs it first, so CI fails on a regression.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m benchmarks $(ARGS)

# Regenerate the committed JSON Schema and AsyncAPI documents from the Pydantic models.
schemas: $(VENV)/.installed
	$(PY) -m schemas.export

clean:
	rm -rf $(VENV) node_modules
