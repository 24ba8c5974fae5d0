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

.PHONY: run test build deps bench bench-encoder bench-bert example install sanitize clean

run: build
	$(PY) benchmarks/main.py

# The CPU kernels are built for AVX-512, AVX2 and a portable version, and run the one
# ATEN_CPU_CAPABILITY allows (this CPU's best by default): the kernels' tests run again with
# AVX2 and the portable version, whose vector widths (and so row tails) differ.
ISA_PYTESTS ?= tests/python/test_ops.py tests/python/test_accuracy.py \
  tests/python/test_memory_efficient.py tests/python/test_value_range.py \
  tests/python/test_reuse_h.py tests/python/test_reuse_grad_out.py tests/python/test_dropout.py

test: build
	$(PY) -m pytest tests/python -q
	for cap in avx2 default; do \
	  echo "pytest with ATEN_CPU_CAPABILITY=$$cap: $(ISA_PYTESTS)"; \
	  ATEN_CPU_CAPABILITY=$$cap $(PY) -m pytest $(ISA_PYTESTS) -q -p no:cacheprovider || exit 1; \
	done
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
	$(EXAMPLE_DIR)/dispatcher_only

# AddressSanitizer + UndefinedBehaviorSanitizer (CPU): libaddnorm, _C and the GoogleTest
# suite built with -DADDNORM_SANITIZE=ON in $(SAN_DIR) (CUDA off), then the GoogleTest suite
# (leak checking on) and the pytest files $(SAN_PYTESTS) against the instrumented library
# ($(SAN_DEFAULT_PYTESTS) a second time with the portable kernels), then the CUDA emulation's
# tests with the emulated kernels built with AddressSanitizer (their indexing checked on CPU
# tensors, as compute-sanitizer's memcheck does on the GPU).
# python and libtorch are not instrumented: the ASan runtime is preloaded (with libstdc++, so
# that it can intercept C++ exceptions), python allocates with malloc (so ASan sees its
# buffers), and the package is python/addnorm's modules linked next to the instrumented _C and
# libaddnorm in $(SAN_PKG). A report aborts the run. Before the tests, the recipe checks that
# the library carries the checks and that python imports it.
SAN_DIR := build/sanitize
SAN_PKG := $(SAN_DIR)/python/addnorm
SAN_CXX ?= g++
SAN_PYTESTS ?= tests/python/test_properties.py tests/python/test_ops.py tests/python/test_autograd.py \
  tests/python/test_errors.py tests/python/test_modules.py tests/python/test_dropout.py \
  tests/python/test_memory_efficient.py
# Large rows and gradcheck repeat, at many times the cost, what the other tests run (and
# torch.compile's tracing, slow under the sanitizers, is the same kernels' calls).
SAN_PYTEST_ARGS ?= -k "not 65536 and not 100003 and not gradcheck and not compile and not budget"
# Run again with the portable CPU kernels (ATEN_CPU_CAPABILITY=default).
SAN_DEFAULT_PYTESTS ?= tests/python/test_properties.py
SAN_ASAN_OPTIONS := halt_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1
SAN_UBSAN_OPTIONS := halt_on_error=1:print_stacktrace=1
# The CUDA emulation (tests/cuda_emulation) under AddressSanitizer: its fibers switch stacks,
# which ASan's use-after-return detection does not follow.
SAN_EMU_ASAN_OPTIONS := halt_on_error=1:detect_leaks=0:detect_stack_use_after_return=0
# (the accuracy tests' long double references add time, not kernel paths; the thread-order
# tests rerun the same accesses in other orders)
SAN_EMU_PYTEST_ARGS ?= -k "not accuracy and not outlier and not thread_order"
SAN_PY_ENV = ASAN_OPTIONS=$(SAN_ASAN_OPTIONS):detect_leaks=0 UBSAN_OPTIONS=$(SAN_UBSAN_OPTIONS) \
  LD_PRELOAD="$$($(SAN_CXX) -print-file-name=libasan.so) $$($(SAN_CXX) -print-file-name=libstdc++.so)" \
  PYTHONMALLOC=malloc PYTHONPATH=$(abspath $(SAN_DIR)/python)$${PYTHONPATH:+:$$PYTHONPATH}

$(SAN_DIR)/.configured: $(DEPS_STAMP)
	$(VENV_PATH) cmake -S . -B $(SAN_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_CXX_COMPILER=$(SAN_CXX) -DADDNORM_SANITIZE=ON -DADDNORM_CUDA=OFF -DADDNORM_BUILD_TESTS=ON \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -DADDNORM_PYTHON_OUTPUT_DIR=$(abspath $(SAN_PKG)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch, pybind11; print(torch.utils.cmake_prefix_path + ";" + pybind11.get_cmake_dir())')"
	touch $@

sanitize: $(SAN_DIR)/.configured
	$(VENV_PATH) cmake --build $(SAN_DIR)
	rm -f $(SAN_PKG)/*.py && ln -s $(abspath python/addnorm)/*.py $(SAN_PKG)/
	nm -D $(SAN_PKG)/libaddnorm.so | grep -q __asan_report_load
	nm -D $(SAN_PKG)/libaddnorm.so | grep -q __ubsan_handle
	ASAN_OPTIONS=$(SAN_ASAN_OPTIONS) UBSAN_OPTIONS=$(SAN_UBSAN_OPTIONS) $(SAN_DIR)/addnorm_tests --gtest_brief=1
	$(SAN_PY_ENV) $(PY) -c 'import addnorm; assert addnorm._C.__file__.startswith("$(abspath $(SAN_PKG))/"), addnorm._C.__file__'
	$(SAN_PY_ENV) $(PY) -m pytest $(SAN_PYTESTS) $(SAN_PYTEST_ARGS) -q -p no:cacheprovider --capture=sys
	ATEN_CPU_CAPABILITY=default $(SAN_PY_ENV) $(PY) -c 'import addnorm; assert addnorm.cpu_capability() == "DEFAULT"'
	ATEN_CPU_CAPABILITY=default $(SAN_PY_ENV) $(PY) -m pytest $(SAN_DEFAULT_PYTESTS) -q -p no:cacheprovider --capture=sys
	ADDNORM_EMULATION_SANITIZE=1 $(SAN_PY_ENV) ASAN_OPTIONS=$(SAN_EMU_ASAN_OPTIONS) \
	  $(PY) -m pytest tests/python/test_cuda_emulated.py $(SAN_EMU_PYTEST_ARGS) -q -p no:cacheprovider \
	  --capture=sys

bench: build
	$(PY) benchmarks/bench_norm.py --json benchmarks/results/cpu.json --md benchmarks/results/cpu.md

bench-encoder: build
	$(PY) benchmarks/bench_encoder.py --shapes 1024x16x512x8 --dtypes fp32,bf16 --min-reps 7 --json benchmarks/results/encoder_cpu.json --md benchmarks/results/encoder_cpu.md

# The 12-layer encoder training step; on the CPU at seq 128, batch 8 (BERT-base sizes
# otherwise), float32, eager and torch.compile.
bench-bert: build
	$(PY) benchmarks/bench_bert.py --device cpu --seq 128 --batch 8 --reps 5 --modes eager,compile --json benchmarks/results/bert_cpu.json --md benchmarks/results/bert_cpu.md

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
	$(VENV_PATH) ADDNORM_BUILD_TESTS=1 ADDNORM_BUILD_DIR=$(BUILD_DIR) \
	  $(PY) -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

clean:
	rm -rf build python/addnorm/*.so python/addnorm/_build_info.py python/addnorm.egg-info
