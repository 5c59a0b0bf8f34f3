# The two commands of the README: `make demo` and `make test`.
# Both create the virtual environment and install iotfuse into it first.
# pip's cache (~/.cache/pip) and Maven's repository (~/.m2) live outside the clone.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
# the edge install: `pip install '.[edge]'` without torch, serving exported models
EDGE_VENV ?= build/edge-venv

.PHONY: install demo test bench lint format typecheck check clean edge

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

# The torch-free install in $(EDGE_VENV) (not editable: what a device would get), and its
# size. `make test` runs the edge tests with it when IOTFUSE_EDGE_VENV names it (CI does).
edge:
	@test -x $(EDGE_VENV)/bin/python || $(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EDGE_VENV)/bin/python -m pip install --quiet -c constraints.txt '.[edge]'
	@! $(EDGE_VENV)/bin/python -c 'import torch' 2>/dev/null || { echo "torch in the edge venv" >&2; exit 1; }
	@du -sh $(EDGE_VENV)

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
	rm -rf $(VENV) $(EDGE_VENV) .pytest_cache .mypy_cache
