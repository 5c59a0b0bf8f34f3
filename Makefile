# The two commands of the README: `make demo` and `make test`.
# Both create the virtual environment and install iotfuse into it first.
# pip's cache (~/.cache/pip) and Maven's repository (~/.m2) live outside the clone.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install demo test bench lint format typecheck check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "iotfuse needs Python 3.11 or newer")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: install
	$(BIN)/iotfuse demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/pipeline_bench.py

SOURCES := pipeline encoders fusion tests bench scripts

lint: install
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

format: install
	$(BIN)/ruff format $(SOURCES)

typecheck: install
	$(BIN)/mypy

check: lint typecheck

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
