#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions run through run_step (bash -c)
# The one prepared script for the GPU machine (one H100/H200, torch 2.11 + CUDA 13 in
# /opt/torch/.venv, no internet): builds addnorm against that torch, runs the CUDA tests,
# compute-sanitizer memcheck and racecheck over scripts/sanitize_kernels.py (every kernel
# path), and the GPU benchmark.
#
#   scripts/gpu_check.sh OUT_DIR
#
# To carry the results off the GPU machine as one file, pack the folder:
#   scripts/gpu_check.sh /tmp/gpu_check; tar -czf gpu_check.tgz -C /tmp gpu_check
#
# OUT_DIR receives one log per step (<step>.log), pytest_cuda.xml (tests/python/test_cuda.py),
# pytest.xml (the rest of the suite's CUDA tests), gpu.json and gpu.md (the benchmark) and
# summary.txt, which is also printed at the end. Every step has a timeout
# and the whole run stays within GPU_CHECK_BUDGET_S seconds (default 450): later steps get
# what is left, and the benchmark drops to --quick when its estimate does not fit.
# A failing step does not stop the run; the exit status is 1 when any step failed.
#
# Knobs: PYTHON (default /opt/torch/.venv/bin/python3 when present, else python3),
# GPU_CHECK_BUDGET_S, PYTEST_K (pytest -k expression for the rest of the suite; default cuda), BENCH_ARGS (replaces the benchmark's
# default arguments), TORCH_CUDA_ARCH_LIST (default: the GPU's compute capability).
set -u

if [ $# -lt 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT_DIR=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

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
BUDGET=${GPU_CHECK_BUDGET_S:-450}
DEADLINE=$((START + BUDGET))
NPROC=$(nproc 2>/dev/null || echo 4)

STEP_NAMES=()
STEP_RESULTS=()
STEP_TIMES=()
STEP_NOTES=()
FAILED=0

record() {  # name result seconds note
  STEP_NAMES+=("$1")
  STEP_RESULTS+=("$2")
  STEP_TIMES+=("$3")
  STEP_NOTES+=("$4")
  if [ "$2" != PASS ]; then FAILED=1; fi
  printf '[gpu_check] %-10s %-7s %4ss  %s\n' "$1" "$2" "$3" "$4"
}

# run_step NAME MAX_SECONDS FUNCTION: runs the shell function FUNCTION (exported, in a
# child bash) with stdout/stderr in OUT_DIR/NAME.log under a timeout of
# min(MAX_SECONDS, time left).
run_step() {
  local name=$1 max_s=$2 fn=$3
  local now left limit t0 rc
  now=$(date +%s)
  left=$((DEADLINE - now))
  limit=$((max_s < left ? max_s : left))
  if [ "$limit" -lt 15 ]; then
    record "$name" FAIL 0 "not run: out of time budget"
    return 1
  fi
  echo "[gpu_check] $name: running (timeout ${limit}s, log $OUT_DIR/$name.log)"
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "$fn" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    record "$name" PASS "$dt" ""
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" FAIL "$dt" "timed out after ${limit}s; see $name.log"
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
  ls -la python/addnorm
  "$PY" -c "import addnorm, sys; print('addnorm', addnorm.__version__, addnorm.__file__, 'cuda_available', addnorm.cuda_available()); \
sys.exit(0 if addnorm.cuda_available() else 1)"
}

test_cuda() {
  set -x
  "$PY" -m pytest tests/python/test_cuda.py -q -ra -p no:cacheprovider \
    --junitxml="$OUT_DIR/pytest_cuda.xml"
}

tests() {
  set -x
  "$PY" -m pytest tests/python --ignore=tests/python/test_cuda.py -k "${PYTEST_K:-cuda}" -q -ra \
    -p no:cacheprovider --junitxml="$OUT_DIR/pytest.xml"
}

memcheck() {
  set -x
  # Without the caching allocator every tensor is its own allocation: out-of-bounds
  # accesses land outside it and are reported.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    --leak-check no --print-limit 50 "$PY" scripts/sanitize_kernels.py
}

racecheck() {
  set -x
  "$SANITIZER" --tool racecheck --racecheck-report hazard --error-exitcode 1 --print-limit 50 \
    "$PY" scripts/sanitize_kernels.py --quick
}

bench() {
  set -x
  if [ ! -f benchmarks/bench_norm.py ]; then
    echo "benchmarks/bench_norm.py not found"
    return 1
  fi
  local args
  if [ -n "${BENCH_ARGS:-}" ]; then
    args=$BENCH_ARGS
  else
    # Full sweep when its estimate fits the time left, else the quick subset.
    local left=$(( DEADLINE - $(date +%s) - 30 ))
    local est_line est=""
    est_line=$(timeout 90 "$PY" benchmarks/bench_norm.py --device cuda --estimate-only 2>&1 | tail -n 1)
    echo "estimate: $est_line (time left for the sweep: ${left}s)"
    if [[ $est_line =~ ~([0-9]+)m([0-9]+)s ]]; then
      est=$(( 10#${BASH_REMATCH[1]} * 60 + 10#${BASH_REMATCH[2]} ))
    elif [[ $est_line =~ ~([0-9]+)s ]]; then
      est=$(( 10#${BASH_REMATCH[1]} ))
    fi
    args=""
    if [ -z "$est" ] || [ $(( est * 3 / 2 )) -gt "$left" ]; then
      echo "using --quick (estimate ${est:-unknown}s does not fit ${left}s)"
      args="--quick"
    fi
  fi
  # shellcheck disable=SC2086
  "$PY" benchmarks/bench_norm.py --device cuda $args --no-progress \
    --json "$OUT_DIR/gpu.json" --md "$OUT_DIR/gpu.md"
}

# One encoder layer at the size the targets name (d_model 1024, nhead 16, seq 512,
# batch 32, bf16): forward+backward vs nn.TransformerEncoderLayer, eval vs its fast path.
encoder_bench() {
  set -x
  "$PY" benchmarks/bench_encoder.py --device cuda --shapes 1024x16x512x32 --dtypes bf16 \
    --modes fwdbwd,eval --no-progress \
    --json "$OUT_DIR/encoder_gpu.json" --md "$OUT_DIR/encoder_gpu.md"
}

# ------------------------------------------------------------------------------- run

export PY ROOT OUT_DIR SANITIZER NPROC DEADLINE
export -f env_info build test_cuda tests memcheck racecheck encoder_bench bench

run_step env 60 env_info
ENV_OK=$?

if [ $ENV_OK -eq 0 ]; then
  run_step build 270 build
  BUILD_OK=$?
else
  skip_step build "no usable CUDA device / torch"
  BUILD_OK=1
fi

# Most important first: the kernel tests and sanitizers, then the rest of the suite on
# CUDA, then the benchmark with whatever time is left.
if [ $BUILD_OK -eq 0 ]; then
  run_step test_cuda 150 test_cuda
  if [ -x "$SANITIZER" ] || command -v "$SANITIZER" >/dev/null 2>&1; then
    run_step memcheck 120 memcheck
    run_step racecheck 90 racecheck
  else
    skip_step memcheck "compute-sanitizer not found"
    skip_step racecheck "compute-sanitizer not found"
  fi
  run_step tests 150 tests
  run_step encoder 120 encoder_bench
  run_step bench 600 bench
else
  for s in test_cuda memcheck racecheck tests encoder bench; do
    skip_step "$s" "build failed"
  done
fi

# ------------------------------------------------------------------------------- summary

TOTAL=$(($(date +%s) - START))
{
  echo "addnorm gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo "python: $PY"
  "$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>/dev/null || true
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+local changes)')"
  echo
  printf '%-10s %-6s %6s  %s\n' STEP RESULT TIME NOTE
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-10s %-6s %5ss  %s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_TIMES[$i]}" "${STEP_NOTES[$i]}"
  done
  echo
  for s in test_cuda tests; do
    if [ -f "$OUT_DIR/$s.log" ]; then
      echo "$s: $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT_DIR/$s.log" | tail -n 1)"
      grep -E '^(FAILED|ERROR) ' "$OUT_DIR/$s.log" | head -n 8
    fi
  done
  for s in memcheck racecheck; do
    if [ -f "$OUT_DIR/$s.log" ]; then
      echo "$s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitize_kernels:' "$OUT_DIR/$s.log" | grep -v '^+' | tr '\n' ' ')"
    fi
  done
  if [ -f "$OUT_DIR/bench.log" ]; then
    grep -E '^(total time|memory-copy bandwidth|using --quick)' "$OUT_DIR/bench.log" | head -n 3
  fi
  echo
  echo "total ${TOTAL}s (budget ${BUDGET}s); logs and results in $OUT_DIR"
  if [ $FAILED -eq 0 ]; then echo "ALL PASSED"; else echo "SOME STEPS FAILED"; fi
} | tee "$OUT_DIR/summary.txt"

exit $FAILED
