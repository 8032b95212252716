# make test:  create .venv if missing, install the pinned dev requirements, build, ruff, pytest
# make bench: the same set-up, then the benchmark suite (results under bench/results/)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
export FASTLM_REQUIRE_EXTENSION := 1
export FASTLM_EMU ?= 1

.PHONY: test bench build lint venv clean

$(VENV)/.requirements: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.requirements

# The extension is rebuilt only when its sources change (pip's editable build starts from scratch).
EXTENSION_SOURCES := setup.py $(shell find csrc -type f)

$(VENV)/.built: $(VENV)/.requirements $(EXTENSION_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

lint: venv
	$(VENV)/bin/ruff check .

test: build lint
	$(PY) -m pytest -q

bench: build
	$(PY) -m bench

clean:
	rm -rf build *.egg-info fastlm/*.so $(VENV)/.built
