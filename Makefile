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

test: $(BIN)/tox
	$(BIN)/tox run -e py,lint,type

lint: $(BIN)/tox
	$(BIN)/tox run -e lint

type: $(BIN)/tox
	$(BIN)/tox run -e type

clean:
	rm -rf $(VENV) .tox .cache .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
