# Two commands do all set-up: `make demo` and `make test`. Only python3 (>= 3.11) and make are needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint env clean-stores

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/uv pip install --python $(BIN)/python --quiet -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/mbcube demo --out stores/demo

lint: $(STAMP)
	$(BIN)/ruff check mbcube tests benchmarks
	$(BIN)/ruff format --check mbcube tests benchmarks
	$(BIN)/mypy mbcube

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-stores:
	rm -rf stores/demo stores/*.zarr
