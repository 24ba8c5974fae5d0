# `make run` and `make test` do all set-up a fresh machine needs: .venv with pinned
# dependencies, the CMake build (incremental), then run. Re-running reuses everything.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BUILD_DIR := build/cmake
DEPS_STAMP := $(VENV)/.requirements-installed
BUILD_STAMP := build/.built
SOURCES := $(shell find csrc tests/cpp cmake -type f 2>/dev/null) CMakeLists.txt setup.py

.PHONY: run test build deps bench clean

run: build
	$(PY) -m addnorm

test: build
	$(PY) -m pytest tests/python -q
	$(VENV)/bin/ctest --test-dir $(BUILD_DIR) --output-on-failure

bench: build
	$(PY) benchmarks/bench_norm.py --json benchmarks/results/cpu.json --md benchmarks/results/cpu.md

deps: $(DEPS_STAMP)

$(DEPS_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements.txt
	touch $@

build: $(BUILD_STAMP)

# Editable install: setup.py runs CMake in $(BUILD_DIR) (kept between runs) and puts
# libaddnorm and _C into python/addnorm; the GoogleTest suite is built alongside.
# pip -v shows the build's progress ([n/m] lines) as it goes.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	ADDNORM_BUILD_TESTS=1 ADDNORM_BUILD_DIR=$(BUILD_DIR) \
	  $(PY) -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

clean:
	rm -rf build python/addnorm/*.so python/addnorm.egg-info
