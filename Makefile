# make test:  create .venv if missing, install the pinned dev requirements, build, ruff, pytest
# make bench: the same set-up, then the benchmark suite (results under bench/results/)
# make test-compat: the low end of the supported range in a second venv (see below)
# make compat: the C++ glue syntax-checked against torch 2.11's headers
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
export FASTLM_REQUIRE_EXTENSION := 1
export FASTLM_EMU ?= 1

.PHONY: test bench build lint venv clean test-compat compat

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

# The low end of the supported range: torch >= 2.11, triton >= 3.6, transformers >= 5.17. .venv-compat has
# triton 3.6 and transformers 5.17 (numpy < 2.4: triton 3.6's interpreter needs it); torch stays 2.13, the
# only CPU build on disk, and torch 2.11 is covered by its C++ headers (`make compat`, also run by `make
# test` as tests/test_compat.py). fastlm comes from .venv's editable install (same python and torch, so
# its extension fits): its import hook is copied over instead of building the extension a second time.
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_PINS := torch==2.13.0 triton==3.6.0 transformers==5.17.0 'numpy<2.4' \
	$(shell grep -E '^(pytest|accelerate)==' requirements-dev.txt)
SITE_PACKAGES := -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
# Every Triton-backend test of the ops, modules and models (under the interpreter), and every patch test.
COMPAT_TESTS := tests/ops tests/nn tests/models tests/test_patch.py -k 'triton or test_patch'

$(COMPAT_VENV)/.requirements: requirements-dev.txt
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet $(COMPAT_PINS)
	touch $@

$(COMPAT_VENV)/.built: $(COMPAT_VENV)/.requirements $(VENV)/.built
	rm -f "$$($(COMPAT_PY) $(SITE_PACKAGES))"/__editable__*fastlm*
	cp "$$($(PY) $(SITE_PACKAGES))"/__editable__*fastlm* "$$($(COMPAT_PY) $(SITE_PACKAGES))"/
	touch $@

test-compat: $(COMPAT_VENV)/.built
	TRITON_INTERPRET=1 $(COMPAT_PY) -m pytest -q $(COMPAT_TESTS) \
		-W 'ignore:Conversion of an array with ndim > 0:DeprecationWarning'

compat: venv
	$(PY) tests/test_compat.py

clean:
	rm -rf build *.egg-info fastlm/*.so $(VENV)/.built $(COMPAT_VENV)/.built
