#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions run through run_step (bash -c)
# The one prepared script for the GPU machine (one H100/H200, torch 2.11 + CUDA 13 in
# /opt/torch/.venv, no internet): loads a prebuilt addnorm (or builds it against that torch),
# runs the CUDA tests (the ones that failed on a GPU before first), compute-sanitizer memcheck
# and racecheck over scripts/sanitize_kernels.py (every kernel path), the GPU benchmark, an
# Nsight Compute profile of the main kernels, the encoder-layer benchmark and profile, the
# 12-layer training step, and the largest-tensor tests.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Prebuilt library: building on the GPU machine costs minutes of its time. Build here for
# the GPU machine's Python (3.12; a Python 3.12 venv with torch 2.11.0 from PyPI is the same
# cu130 build) with scripts/build_prebuilt.sh, which leaves libaddnorm.so and
# _C.cpython-312-*.so (and _build_info.py) in build/prebuilt/; carry that folder. PREBUILT (default
# build/prebuilt) is used when it holds a _C for this Python, built against this torch from
# this tree's sources (scripts/source_hash.sh); else the script builds.
#
# To carry the results off the GPU machine as one file, PACK=1 packs what OUT_DIR holds into
# OUT_DIR/gpu_check.tgz and removes the rest, so OUT_DIR must be empty at the start (it may
# be the folder that comes back):
#   PACK=1 scripts/gpu_check.sh /tmp/out     # -> /tmp/out/gpu_check.tgz
#
# OUT_DIR receives one log per step (<step>.log), pytest_*.xml, bench.json / bench.md (the
# benchmark), profile.txt (ncu), encoder_gpu.json / .md and bert_gpu.json / .md (the encoder
# layer and the 12-layer step) and summary.txt, which is also printed at the end. Every
# step has a timeout and the whole run stays within GPU_CHECK_BUDGET_S seconds (default
# 480): later steps get what is left, and those left with too little are not run (SKIP in
# the summary). A failing step does not stop the run; the exit status is 1 when any step
# failed.
#
# Knobs: PYTHON (default /opt/torch/.venv/bin/python3 when present, else python3),
# GPU_CHECK_BUDGET_S, STEPS (comma list, default env,build,first,test_cuda,tests,memcheck,
# racecheck,bench,profile,encoder,encoder_profile,bert,large; also ab, below), PYTEST_K (pytest -k expression for
# the rest of the suite; default cuda), PYTEST_JOBS (pytest-xdist workers when available;
# default 8), PYTEST_TIMEOUT (seconds per test, with pytest-timeout; default 90), PACK, BENCH_ARGS (replaces the benchmark's default arguments), BENCH_BASELINE (see bench), TORCH_CUDA_ARCH_LIST
# (default: the GPU's compute capability).
set -u

if [ $# -lt 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT_DIR=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
if [ "${PACK:-0}" = 1 ] && [ -n "$(ls -A "$OUT_DIR")" ]; then
  echo "PACK=1 removes what it packs: OUT_DIR ($OUT_DIR) must be empty" >&2
  exit 2
fi

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x /opt/torch/.venv/bin/python3 ]; then
  PY=/opt/torch/.venv/bin/python3
else
  PY=python3
fi
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
STEPS=",${STEPS:-env,build,first,test_cuda,tests,memcheck,racecheck,bench,profile,encoder,encoder_profile,bert,large},"
PREBUILT=${PREBUILT:-$ROOT/build/prebuilt}
# pytest-xdist carried with the prebuilt library (scripts/build_prebuilt.sh), if any
if [ -d "$PREBUILT/pydeps" ]; then export PYTHONPATH="$PYTHONPATH:$PREBUILT/pydeps"; fi
# The commit, for the benchmarks' result files where the tree has no git history
# (benchmarks/common.py, source_revision): the prebuilt library's, if built from this tree.
if [ -z "${ADDNORM_SOURCE_REVISION:-}" ] && [ -f "$PREBUILT/revision.txt" ] &&
  [ "$(cat "$PREBUILT/sources.sha256" 2>/dev/null)" = "$("$ROOT/scripts/source_hash.sh")" ]; then
  ADDNORM_SOURCE_REVISION=$(cat "$PREBUILT/revision.txt")
  export ADDNORM_SOURCE_REVISION
fi
DEADLINE=$((START + BUDGET))
NPROC=$(nproc 2>/dev/null || echo 4)

STEP_NAMES=()
STEP_RESULTS=()
STEP_TIMES=()
STEP_NOTES=()
FAILED=0
NOT_RUN=0

record() {  # name result seconds note (result PASS, FAIL, or SKIP: not run for lack of time)
  STEP_NAMES+=("$1")
  STEP_RESULTS+=("$2")
  STEP_TIMES+=("$3")
  STEP_NOTES+=("$4")
  if [ "$2" = FAIL ]; then FAILED=1; fi
  if [ "$2" = SKIP ]; then NOT_RUN=$((NOT_RUN + 1)); fi
  printf '[gpu_check] %-10s %-7s %4ss  %s\n' "$1" "$2" "$3" "$4"
}

# run_step NAME MAX_SECONDS FUNCTION: runs the shell function FUNCTION (exported, in a
# child bash) with stdout/stderr in OUT_DIR/NAME.log under a timeout of
# min(MAX_SECONDS, time left). The time limit sends SIGINT (then, 20 s on, SIGKILL): pytest
# stopped by it still prints its summary and writes its XML report. Each test that fails is
# also named in OUT_DIR/NAME.failed as it fails (tests/python/conftest.py), for a run that
# ends before its summary.
run_step() {
  local name=$1 max_s=$2 fn=$3
  local now left limit t0 rc
  now=$(date +%s)
  left=$((DEADLINE - now))
  limit=$((max_s < left ? max_s : left))
  if [ "$limit" -lt 15 ]; then
    record "$name" SKIP 0 "not run: out of time budget (GPU_CHECK_BUDGET_S)"
    return 1
  fi
  echo "[gpu_check] $name: running (timeout ${limit}s, log $OUT_DIR/$name.log)"
  t0=$(date +%s)
  rm -f "$OUT_DIR/$name.failed"
  ADDNORM_FAILED_LOG="$OUT_DIR/$name.failed" timeout -s INT -k 20 "$limit" bash -c "$fn" \
    >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    record "$name" PASS "$dt" ""
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    local why="timed out after ${limit}s"
    [ "$limit" -lt "$max_s" ] && why="$why (the time budget's end; the step's own limit ${max_s}s)"
    record "$name" FAIL "$dt" "$why; see $name.log"
  else
    record "$name" FAIL "$dt" "exit $rc; see $name.log"
  fi
  return $rc
}

skip_step() {  # name reason
  record "$1" FAIL 0 "not run: $2"
}

# ------------------------------------------------------------------------------- steps

env_info() {
  set -x
  date
  uname -a
  nvidia-smi || true
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('cuda available', torch.cuda.is_available()); \
print([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  nvcc --version || true
  cmake --version || true
  ninja --version || true
  "$SANITIZER" --version || true
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
}

find_sanitizer() {
  local c nvcc_dir=""
  if command -v nvcc >/dev/null 2>&1; then nvcc_dir=$(dirname "$(command -v nvcc)"); fi
  for c in "$(command -v compute-sanitizer 2>/dev/null)" \
           "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
           "${nvcc_dir:-/nonexistent}/compute-sanitizer" \
           "${nvcc_dir:-/nonexistent}/../compute-sanitizer/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer \
           /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}
SANITIZER=$(find_sanitizer || echo compute-sanitizer)

build() {
  set -x
  local ext so
  ext=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))") || return 1
  so="$PREBUILT/_C$ext"
  local have_torch built_torch=""
  have_torch=$("$PY" -c "import torch; print(torch.__version__)") || return 1
  [ -f "$PREBUILT/_build_info.py" ] &&
    built_torch=$(sed -n 's/^torch_version = "\(.*\)"$/\1/p' "$PREBUILT/_build_info.py")
  if [ -f "$so" ] && [ -n "$built_torch" ] && [ "$built_torch" != "$have_torch" ]; then
    echo "the prebuilt library was built against torch $built_torch, this is torch $have_torch: building"
    so=/nonexistent
  fi
  local have_src built_src=""
  have_src=$("$ROOT/scripts/source_hash.sh") || return 1
  [ -f "$PREBUILT/sources.sha256" ] && built_src=$(cat "$PREBUILT/sources.sha256")
  if [ -f "$so" ] && [ "$built_src" != "$have_src" ]; then
    echo "the prebuilt library was not built from this tree's sources (scripts/source_hash.sh:" \
      "${built_src:-none recorded} there, $have_src here): building"
    so=/nonexistent
  fi
  local cap built_arch
  cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  built_arch=$(cat "$PREBUILT/cuda_arch.txt" 2>/dev/null || echo 9.0)  # (older builds: 9.0)
  if [ -f "$so" ] && ! [[ " ${built_arch//;/ } " =~ \ $cap(\+PTX)?\  ]]; then
    echo "the prebuilt library holds kernels for $built_arch, this GPU is $cap: building"
    so=/nonexistent
  fi
  if [ -f "$so" ] && [ -f "$PREBUILT/libaddnorm.so" ]; then
    echo "using the prebuilt library in $PREBUILT (built against torch ${built_torch:-unknown})"
    cp "$PREBUILT/libaddnorm.so" "$so" "$PREBUILT/_build_info.py" python/addnorm/ || return 1
  else
    local arch=${TORCH_CUDA_ARCH_LIST:-}
    if [ -z "$arch" ]; then
      arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
    fi
    export TORCH_CUDA_ARCH_LIST="$arch" ADDNORM_CUDA=ON ADDNORM_BUILD_TESTS=0 MAX_JOBS="$NPROC"
    export ADDNORM_BUILD_DIR="$ROOT/build/gpu"
    # The Makefile's route (editable install: setup.py runs CMake and puts libaddnorm and _C
    # into python/addnorm); if pip cannot do it offline, the same CMake build directly.
    if ! "$PY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps --no-index -e .; then
      echo "pip install -e failed; building with CMake directly"
      local prefix
      prefix=$("$PY" -c "import torch, pybind11; print(torch.utils.cmake_prefix_path + ';' + pybind11.get_cmake_dir())") || return 1
      cmake -S "$ROOT" -B "$ADDNORM_BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        "-DCMAKE_PREFIX_PATH=$prefix" "-DPython_EXECUTABLE=$(command -v "$PY" || echo "$PY")" \
        "-DADDNORM_PYTHON_OUTPUT_DIR=$ROOT/python/addnorm" -DADDNORM_CUDA=ON -DADDNORM_BUILD_TESTS=OFF &&
        cmake --build "$ADDNORM_BUILD_DIR" -j "$NPROC" || return 1
    fi
  fi
  ls -la python/addnorm
  # (-X faulthandler: a crash in the import prints the Python stack; then gdb's, if any)
  # One op on the GPU: a library without code for this GPU ("no kernel image") fails here.
  "$PY" -X faulthandler -c "import addnorm, sys, torch; print('addnorm', addnorm.__version__, addnorm.__file__, 'cuda_available', addnorm.cuda_available()); \
addnorm.cuda_available() or sys.exit(1); x = torch.randn(4, 64, device='cuda'); \
torch.testing.assert_close(addnorm.layer_norm(x, 64), torch.nn.functional.layer_norm(x, (64,))); print('one op on', torch.cuda.get_device_name(0), 'ok')"
  local rc=$?
  if [ $rc -gt 128 ] && command -v gdb >/dev/null 2>&1; then
    gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args "$PY" -c "import addnorm" 2>&1 |
      tail -n 80
  fi
  return $rc
}

# pytest with pytest-xdist workers when it is installed. Each worker gets its share of the
# cores for torch's CPU threads (the references and the CPU side of every comparison): with
# each of 8 workers running 16 OpenMP threads on 16 cores, the first tests with rows large
# enough for parallel CPU loops (N >= 16392 in test_cuda.py) stalled the whole step. With
# pytest-timeout, a test running past PYTEST_TIMEOUT seconds (default 90) has every
# thread's stack dumped into the log and its worker ended, so a hang names itself; the ten
# slowest tests are listed at the end.
run_pytest() {
  local jobs=${PYTEST_JOBS:-8} xdist=() timeout=()
  if "$PY" -c "import xdist" 2>/dev/null && [ "$jobs" -gt 1 ]; then
    xdist=(-n "$jobs")
  else
    jobs=1
  fi
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    timeout=(--timeout "${PYTEST_TIMEOUT:-90}" --timeout-method thread)
  fi
  local threads=$((NPROC / jobs))
  [ "$threads" -ge 1 ] || threads=1
  OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$PY" -m pytest "${xdist[@]}" \
    "${timeout[@]}" -q -ra --durations 10 -p no:cacheprovider -p no:benchmark "$@"
}

# The tests that failed on an H100 before (N=1 gradients, NaN propagation of float64 RMSNorm,
# accuracy against torch's kernels), the tests that pin their causes down, the CUDA tests of
# the fused dropout and the memory-efficient backward (same mask as the CPU, graph replay,
# backward from the output, fused input gradient), the first-element-outlier rows
# (accuracy), the tangents-with-a-graph path (autograd), the float32 backward in double
# (statistics from h; also the float32 gradients' accuracy), and the encoder layer's CUDA
# tests (parity with torch's layer, and torch's fused inference kernel for float16/bfloat16
# eval, which has not run on a GPU yet). The float32 weight gradient kept in double, the
# float64 backward's exact addition of h's gradient (test_accuracy) and the autograd node's
# cheaper call path (kernels given contiguous tensors without [M, N] views; every CUDA test
# goes through it) have not run on a GPU yet either, nor have the kernels' values under
# create_graph and inside torch.func transforms, and the ops' vmap rule (test_autograd:
# create_graph_first_order, functorch, vmap_rule).
FIRST_FILES="test_accuracy.py test_errors.py test_ops.py test_dropout.py test_memory_efficient.py test_autograd.py test_encoder_layer.py"
FIRST_SEL="encoder_layer or accuracy or nan_inf or one_element or 4097-1 or dropout or mask or replay or keeping_h or from_output or fused_input or weight_with_zero or tangents or forward_mode_add_norm or gradgradcheck_add_norm or statistics_from_h or create_graph_first_order or functorch or vmap_rule"
first() {
  set -x
  local f files=()
  for f in $FIRST_FILES; do files+=("tests/python/$f"); done
  run_pytest "${files[@]}" -k "cuda and ($FIRST_SEL)" --junitxml="$OUT_DIR/pytest_first.xml"
}

# (without the largest tensors: the large step runs them, last; they take most of the time)
LARGE_K="more_than_2_31 or many_rows"
test_cuda() {
  set -x
  run_pytest tests/python/test_cuda.py -k "not ($LARGE_K)" --junitxml="$OUT_DIR/pytest_cuda.xml"
}

large() {
  set -x
  run_pytest tests/python/test_cuda.py -k "$LARGE_K" --junitxml="$OUT_DIR/pytest_large.xml"
}

# The rest of the suite's CUDA cases: without those the first step ran (when it is among the
# steps) and without the CPU emulation of the kernels (test_cuda_emulated.py, which -k cuda
# selects by its name: it builds the emulator, and the GPU runs the kernels themselves).
tests() {
  set -x
  local k=${PYTEST_K:-cuda}
  if [[ $STEPS == *,first,* ]]; then
    k="($k) and not ((${FIRST_FILES// / or }) and ($FIRST_SEL))"
  fi
  run_pytest tests/python --ignore=tests/python/test_cuda.py \
    --ignore=tests/python/test_cuda_emulated.py -k "$k" --junitxml="$OUT_DIR/pytest.xml"
}

memcheck() {
  set -x
  # Without the caching allocator every tensor is its own allocation: out-of-bounds
  # accesses land outside it and are reported.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    --leak-check no --print-limit 50 "$PY" scripts/sanitize_kernels.py || return 1
  # Grids of two CTAs: each walks several row chunks (the backward's weight partials fetch
  # the next chunk's rows ahead), which the sanitizer's few rows never give a larger grid.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 ADDNORM_CUDA_MAX_GRID=2 "$SANITIZER" --tool memcheck \
    --error-exitcode 1 --leak-check no --print-limit 50 "$PY" scripts/sanitize_kernels.py --quick
}

racecheck() {  # (grids of two CTAs, as memcheck's second run: shared memory across chunks)
  set -x
  ADDNORM_CUDA_MAX_GRID=2 "$SANITIZER" --tool racecheck --racecheck-report hazard \
    --error-exitcode 1 --print-limit 50 "$PY" scripts/sanitize_kernels.py --quick
}

# BENCH_BASELINE: earlier results for bench_cuda.py's --baseline column (default on an H200:
# the last committed H200 run's; "none": no column).
bench() {
  local base=${BENCH_BASELINE:-} baseline=()
  if [ -z "$base" ] && nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -q H200; then
    base=benchmarks/results/gpu_h200_large_r2.json,benchmarks/results/gpu_h200_dropout_r2.json
  fi
  if [ -n "$base" ] && [ "$base" != none ]; then
    baseline=(--baseline "$base")
  fi
  set -x
  # shellcheck disable=SC2086
  "$PY" benchmarks/bench_cuda.py ${BENCH_ARGS:-} "${baseline[@]}" --no-progress \
    --json "$OUT_DIR/bench.json" --md "$OUT_DIR/bench.md"
}

# A second build's benchmark beside the first's (same run): AB_PREBUILT (default
# build/prebuilt-b), built by scripts/build_prebuilt.sh from the same sources with other
# CMake options (its cmake_args.txt), runs bench_cuda.py with AB_ARGS (default BENCH_ARGS)
# and the bench step's results as the baseline: "x vs baseline" is then the first build's
# time / the second's. Results: bench_b.json / .md.
ab() {
  local b=${AB_PREBUILT:-$ROOT/build/prebuilt-b} ext dir
  ext=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))") || return 1
  if [ ! -f "$b/_C$ext" ] || [ ! -f "$b/libaddnorm.so" ]; then
    echo "no second build in $b (scripts/build_prebuilt.sh with PREBUILT_DIR)"
    return 1
  fi
  if [ "$(cat "$b/sources.sha256" 2>/dev/null)" != "$("$ROOT/scripts/source_hash.sh")" ]; then
    echo "the second build in $b was not built from this tree's sources"
    return 1
  fi
  [ -f "$OUT_DIR/bench.json" ] || { echo "no bench.json: the bench step runs first"; return 1; }
  echo "second build: $b, CMake options: $(cat "$b/cmake_args.txt" 2>/dev/null)"
  dir=$(mktemp -d) || return 1
  cp -r "$ROOT/python/addnorm" "$dir/" &&
    cp "$b/libaddnorm.so" "$b/_C$ext" "$b/_build_info.py" "$dir/addnorm/" || return 1
  set -x
  PYTHONPATH="$dir:$PYTHONPATH" "$PY" -c "import addnorm; print(addnorm.__file__)" || return 1
  # shellcheck disable=SC2086
  PYTHONPATH="$dir:$PYTHONPATH" "$PY" benchmarks/bench_cuda.py ${AB_ARGS:-${BENCH_ARGS:-}} \
    --baseline "$OUT_DIR/bench.json" --no-progress --json "$OUT_DIR/bench_b.json" \
    --md "$OUT_DIR/bench_b.md"
}

# Nsight Compute on the main kernels (register and looping paths, forward and backward).
profile() {
  set -x
  local ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1 || true)
  if [ -z "$ncu" ]; then
    ncu=$(ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
  fi
  [ -n "$ncu" ] || { echo "ncu not found"; return 1; }
  "$ncu" -k regex:norm_ --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    "$PY" scripts/profile_kernels.py >"$OUT_DIR/profile.txt" 2>&1
  local rc=$?
  grep -E "norm_|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Block Size|Grid Size" \
    "$OUT_DIR/profile.txt" | head -n 200
  return $rc
}

# One encoder layer at the size the targets name (d_model 1024, nhead 16, seq 512,
# batch 32, bf16; post-LN, then pre-LN): forward+backward vs nn.TransformerEncoderLayer, eval vs its fast path
# (without torch.compile of the layer, whose compilations would take this step's time; the
# bert step compares compiled models).
encoder_bench() {
  set -x
  "$PY" benchmarks/bench_encoder.py --device cuda --shapes 1024x16x512x32 --dtypes bf16 \
    --modes fwdbwd,eval --no-compile --no-progress \
    --json "$OUT_DIR/encoder_gpu.json" --md "$OUT_DIR/encoder_gpu.md" || return 1
  # and pre-LN (the targets name both)
  "$PY" benchmarks/bench_encoder.py --device cuda --shapes 1024x16x512x32 --dtypes bf16 \
    --modes fwdbwd,eval --no-compile --no-progress --norm-first \
    --json "$OUT_DIR/encoder_gpu_prenorm.json" --md "$OUT_DIR/encoder_gpu_prenorm.md"
}

# Where the encoder layer's eval forward spends its GPU time, addnorm's against torch's
# inference fast path (kernel tables of torch.profiler), at the same size.
encoder_profile() {
  set -x
  "$PY" scripts/profile_encoder.py --device cuda --shape 1024x16x512x32 --dtype bf16
}

# The 12-layer encoder training step at BERT-base sizes (bf16 autocast, dropout 0.1):
# eager (time, host time, peak memory), CUDA graph, torch.compile.
bert_bench() {
  set -x
  "$PY" benchmarks/bench_bert.py --device cuda --no-progress \
    --json "$OUT_DIR/bert_gpu.json" --md "$OUT_DIR/bert_gpu.md"
}

# ------------------------------------------------------------------------------- run

export PY ROOT OUT_DIR SANITIZER NPROC DEADLINE PREBUILT
export LARGE_K FIRST_FILES FIRST_SEL STEPS
export -f env_info build run_pytest first test_cuda large tests memcheck racecheck bench ab profile \
  encoder_bench encoder_profile bert_bench

want() { [[ $STEPS == *",$1,"* ]]; }

ENV_OK=0
if want env; then
  run_step env 60 env_info
  ENV_OK=$?
fi

BUILD_OK=0
if [ $ENV_OK -ne 0 ]; then
  BUILD_OK=1
  skip_step build "no usable CUDA device / torch"
elif want build; then
  run_step build 270 build
  BUILD_OK=$?
fi

# In the order STEPS names them (default: the tests that failed before, the kernel tests and
# sanitizers, the rest of the suite on CUDA, then the benchmark and the profile with whatever
# time is left).
step_spec() {  # name -> "max_seconds function"
  case $1 in
    first) echo "150 first" ;;
    test_cuda) echo "150 test_cuda" ;;
    tests) echo "240 tests" ;;
    large) echo "150 large" ;;
    memcheck) echo "150 memcheck" ;;
    racecheck) echo "90 racecheck" ;;
    bench) echo "300 bench" ;;
    ab) echo "300 ab" ;;
    profile) echo "90 profile" ;;
    encoder) echo "120 encoder_bench" ;;
    encoder_profile) echo "60 encoder_profile" ;;
    bert) echo "240 bert_bench" ;;
    *) echo "" ;;
  esac
}
IFS=, read -r -a STEP_LIST <<<"$STEPS"
for name in "${STEP_LIST[@]}"; do
  [[ -z $name || $name == env || $name == build ]] && continue
  spec=$(step_spec "$name")
  if [ -z "$spec" ]; then
    skip_step "$name" "unknown step"
    continue
  fi
  read -r max_s fn <<<"$spec"
  if [ $BUILD_OK -ne 0 ]; then
    skip_step "$name" "build failed"
  elif [[ $name == memcheck || $name == racecheck ]] && \
       ! { [ -x "$SANITIZER" ] || command -v "$SANITIZER" >/dev/null 2>&1; }; then
    skip_step "$name" "compute-sanitizer not found"
  else
    run_step "$name" "$max_s" "$fn"
  fi
done

# ------------------------------------------------------------------------------- summary

TOTAL=$(($(date +%s) - START))
{
  echo "addnorm gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo "python: $PY"
  "$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>/dev/null || true
  if git -C "$ROOT" rev-parse --short HEAD >/dev/null 2>&1; then
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet || echo ' (+local changes)')"
  fi
  echo "sources: $("$ROOT/scripts/source_hash.sh" 2>/dev/null || echo unknown)"
  echo
  printf '%-10s %-6s %6s  %s\n' STEP RESULT TIME NOTE
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-10s %-6s %5ss  %s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_TIMES[$i]}" "${STEP_NOTES[$i]}"
  done
  echo
  for s in first test_cuda tests large; do
    if [ -f "$OUT_DIR/$s.log" ]; then
      echo "$s: $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT_DIR/$s.log" | tail -n 1)"
      grep -E '^(FAILED|ERROR) ' "$OUT_DIR/$s.log" | head -n 8
      if [ -s "$OUT_DIR/$s.failed" ] && ! grep -qE '^(FAILED|ERROR) ' "$OUT_DIR/$s.log"; then
        echo "  failed before the run was stopped ($s.failed):"
        head -n 8 "$OUT_DIR/$s.failed" | sed 's/^/  /'
      fi
    fi
  done
  for s in memcheck racecheck; do
    if [ -f "$OUT_DIR/$s.log" ]; then
      echo "$s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitize_kernels:' "$OUT_DIR/$s.log" | grep -v '^+' | tr '\n' ' ')"
    fi
  done
  for s in bench ab; do
    if [ -f "$OUT_DIR/$s.log" ]; then
      grep -E '^(total time|device:)' "$OUT_DIR/$s.log" | head -n 3
    fi
  done
  echo
  echo "total ${TOTAL}s (budget ${BUDGET}s); logs and results in $OUT_DIR"
  if [ $FAILED -ne 0 ]; then
    echo "SOME STEPS FAILED"
  elif [ $NOT_RUN -ne 0 ]; then
    echo "THE STEPS RUN PASSED; $NOT_RUN NOT RUN (out of time budget)"
  else
    echo "ALL PASSED"
  fi
} | tee "$OUT_DIR/summary.txt"

# PACK=1: what OUT_DIR holds packed into OUT_DIR/gpu_check.tgz, the rest removed (one file
# to carry off the machine; the archive is made outside OUT_DIR, then moved in).
if [ "${PACK:-0}" = 1 ]; then
  pack=$(mktemp "${TMPDIR:-/tmp}/gpu_check.XXXXXX") &&
    chmod 644 "$pack" && tar -czf "$pack" -C "$OUT_DIR" . && find "$OUT_DIR" -mindepth 1 -delete &&
    mv "$pack" "$OUT_DIR/gpu_check.tgz" && echo "packed into $OUT_DIR/gpu_check.tgz"
fi

exit $FAILED
