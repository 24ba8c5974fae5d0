# `make run` and `make test` do all set-up a fresh machine needs: .venv with pinned
# dependencies, the CMake build (incremental), then run. Re-running reuses everything.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BUILD_DIR := build/cmake
DEPS_STAMP := $(VENV)/.requirements-installed
BUILD_STAMP := build/.built
SOURCES := $(shell find csrc tests/cpp cmake -type f 2>/dev/null) CMakeLists.txt setup.py VERSION
# torch's version file: a torch upgraded in .venv (by installing another package) rebuilds.
TORCH_VERSION_FILE = $(wildcard $(VENV)/lib/python*/site-packages/torch/version.py)

EXAMPLE_DIR := build/example
INSTALL_DIR := build/install
EXAMPLE_STAMP := $(EXAMPLE_DIR)/.configured
# The venv's cmake and ninja (pinned in requirements.txt).
VENV_PATH = PATH="$(abspath $(VENV))/bin:$$PATH"

.PHONY: run test build deps bench bench-encoder example install clean

run: build
	$(PY) benchmarks/main.py

test: build
	$(PY) -m pytest tests/python -q
	$(VENV)/bin/ctest --test-dir $(BUILD_DIR) --output-on-failure
	$(MAKE) --no-print-directory example

# The C++ example (examples/cpp) as an outside project: install the CMake package into
# $(INSTALL_DIR), build the app against it in $(EXAMPLE_DIR) (configured once, then
# incremental) and run it on the inputs make_inputs.py writes (rewritten when make_inputs.py
# or the package changes: they include a TorchScript model scripted from addnorm's modules).
install: build
	$(VENV_PATH) cmake --install $(BUILD_DIR) --prefix $(INSTALL_DIR)

$(EXAMPLE_DIR)/inputs.pt: examples/cpp/make_inputs.py $(BUILD_STAMP) $(wildcard python/addnorm/*.py)
	$(PY) examples/cpp/make_inputs.py $@

$(EXAMPLE_STAMP): examples/cpp/CMakeLists.txt $(DEPS_STAMP) | install
	$(VENV_PATH) cmake -S examples/cpp -B $(EXAMPLE_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$(abspath $(INSTALL_DIR));$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	touch $@

example: install $(EXAMPLE_STAMP) $(EXAMPLE_DIR)/inputs.pt
	$(VENV_PATH) cmake --build $(EXAMPLE_DIR)
	$(EXAMPLE_DIR)/app $(EXAMPLE_DIR)/inputs.pt

bench: build
	$(PY) benchmarks/bench_norm.py --json benchmarks/results/cpu.json --md benchmarks/results/cpu.md

bench-encoder: build
	$(PY) benchmarks/bench_encoder.py --json benchmarks/results/encoder_cpu.json --md benchmarks/results/encoder_cpu.md

deps: $(DEPS_STAMP)

$(DEPS_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements.txt
	touch $@

build: $(BUILD_STAMP)

# Editable install: setup.py runs CMake in $(BUILD_DIR) (kept between runs) and puts
# libaddnorm and _C into python/addnorm; the GoogleTest suite is built alongside.
# pip -v shows the build's progress ([n/m] lines) as it goes.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES) $(TORCH_VERSION_FILE)
	ADDNORM_BUILD_TESTS=1 ADDNORM_BUILD_DIR=$(BUILD_DIR) \
	  $(PY) -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

clean:
	rm -rf build python/addnorm/*.so python/addnorm.egg-info
