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
	# --compile-bytecode: .pyc files written once here, so that every Python process (the tests
	# start many) reads them even where PYTHONDONTWRITEBYTECODE is set (~3 CPU s per process)
	$(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/mbcube demo --out stores/demo

lint: $(STAMP)
	$(BIN)/ruff check mbcube tests benchmarks
	$(BIN)/ruff format --check mbcube tests benchmarks
	$(BIN)/mypy mbcube

# pytest's exit code 5 (no tests collected) is a failure, not a green run.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

clean-stores:
	rm -rf stores/demo stores/*.zarr
