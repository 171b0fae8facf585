# Two commands set up everything on a fresh machine:
#   make demo   creates .venv, installs the package, and runs a real `mergekit-yaml` WUDI merge
#   make test   creates .venv, installs the package + test deps, and runs the whole test suite
# torch==2.13.0 is installed first (a CPU build here) so nothing pulls a multi-GB CUDA build;
# the package itself accepts any torch>=2.1.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
# Console scripts of the venv (mergekit-yaml) without activating it.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-fast install bench-speed bench-quality bench-mudsc

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python examples/demo.py --workdir demo-output

test: install
	$(BIN)/python -m pytest -q tests
	MERGEKIT_SDIST_CACHE=$(abspath $(VENV))/sdist bash tests/mergekit_upstream/run.sh

test-fast: install
	$(BIN)/python -m pytest -q tests

bench-speed: install
	$(BIN)/python benchmarks/speed.py

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test,benchmark]'
	touch $@

bench-quality: $(VENV)/.bench-installed
	test -d /usr/share/games/fortunes || (apt-get install -y fortunes || (apt-get update && apt-get install -y fortunes))
	$(BIN)/python benchmarks/quality.py

bench-mudsc: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/mudsc.py
