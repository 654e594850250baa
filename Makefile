# `make demo` and `make test` set everything up on a fresh machine: a virtual environment in .venv with
# torch installed first (the pinned build; unpinned, other packages drag in a second torch), then the
# project and every extra at the exact versions of constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: setup test demo lint bench mutate clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests

demo: $(STAMP)
	$(BIN)/tokenreduce demo

lint: $(STAMP)
	$(BIN)/ruff check .

# Mutation testing (mutmut, one worker): every group of scripts/mutate.py, or MODULE=<path> alone.
# Slow (one test run per mutant); not part of `make test`.
mutate: $(STAMP)
	$(BIN)/python scripts/mutate.py $(MODULE) --max-children $(or $(MUTATE_WORKERS),1)

bench: $(STAMP)
	$(BIN)/python benchmarks/prefill.py

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
