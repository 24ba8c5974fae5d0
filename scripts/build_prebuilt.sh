#!/usr/bin/env bash
# Builds libaddnorm.so and addnorm._C (with _build_info.py, the torch version they were
# built against) for another Python into build/prebuilt/, for
# scripts/gpu_check.sh on a machine that should not spend its time compiling (the GPU
# machine: Python 3.12 with torch 2.11.0+cu130; a Python 3.12 venv with torch==2.11.0 from
# PyPI is the same build, so the result loads there).
#
#   PYTHON=/path/to/python3.12 scripts/build_prebuilt.sh
#
# PYTHON must have torch (the version requirements.txt pins), pybind11, cmake and ninja.
# Default: .venv-py312/bin/python, created with python3.12 and requirements.txt when absent.
# TORCH_CUDA_ARCH_LIST defaults to 9.0 (H100/H200).
#
# A second build of the same sources with other CMake options, for gpu_check.sh's ab step
# (its benchmark beside the first build's, same run): PREBUILT_DIR (default build/prebuilt;
# the CMake folder is PREBUILT_DIR-cmake) and PREBUILT_CMAKE_ARGS, recorded in
# PREBUILT_DIR/cmake_args.txt, e.g.
#   PREBUILT_DIR=build/prebuilt-b PREBUILT_CMAKE_ARGS=-DADDNORM_CUDA_BWD_AHEAD=OFF scripts/build_prebuilt.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
sources=$("$ROOT/scripts/source_hash.sh")  # (of the tree the build starts from)
PY=${PYTHON:-$ROOT/.venv-py312/bin/python}
if [ ! -x "$PY" ]; then
  echo "creating .venv-py312 (python3.12) with the pinned requirements"
  py312=python3.12
  # pyenv's shim fails unless 3.12 is selected: take pyenv's newest 3.12 directly
  if ! "$py312" -c '' 2>/dev/null && command -v pyenv >/dev/null; then
    v=$(pyenv versions --bare | grep -E '^3[.]12([.]|$)' | tail -n 1 || true)
    if [ -n "$v" ]; then py312="$(pyenv root)/versions/$v/bin/python3.12"; fi
  fi
  if ! "$py312" -c '' 2>/dev/null; then
    echo "error: no python3.12 found (on PATH or in pyenv); set PYTHON to a Python 3.12 with torch" >&2
    exit 1
  fi
  "$py312" -m venv "$ROOT/.venv-py312"
  "$ROOT/.venv-py312/bin/python" -m pip install --disable-pip-version-check -r requirements.txt
  PY=$ROOT/.venv-py312/bin/python
fi
want=$(grep -E '^torch==' requirements.txt | cut -d= -f3)
have=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$want" != "$have" ]; then
  echo "error: $PY has torch $have; requirements.txt pins $want" >&2
  exit 1
fi
prefix=$("$PY" -c "import torch, pybind11; print(torch.utils.cmake_prefix_path + ';' + pybind11.get_cmake_dir())")
bin=$(dirname "$PY")
export PATH="$bin:$PATH" TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
out=$(realpath -m "${PREBUILT_DIR:-$ROOT/build/prebuilt}")
read -r -a extra <<<"${PREBUILT_CMAKE_ARGS:-}"
# (options left out of PREBUILT_CMAKE_ARGS: their defaults, not what the cache last held)
cmake -S "$ROOT" -B "$out-cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  "-DCMAKE_PREFIX_PATH=$prefix" "-DPython_EXECUTABLE=$PY" -UADDNORM_CUDA_BWD_AHEAD \
  "-DADDNORM_PYTHON_OUTPUT_DIR=$out" -DADDNORM_CUDA=ON -DADDNORM_BUILD_TESTS=OFF "${extra[@]}"
cmake --build "$out-cmake" -j "${MAX_JOBS:-$(nproc)}"
echo "$sources" > "$out/sources.sha256"  # gpu_check.sh compares it
# (the commit, for the benchmarks' result files on a machine with the tree but not its history)
rev=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then rev="$rev+changes"; fi
echo "$rev" > "$out/revision.txt"
echo "${PREBUILT_CMAKE_ARGS:-}" > "$out/cmake_args.txt"
echo "$TORCH_CUDA_ARCH_LIST" > "$out/cuda_arch.txt"  # gpu_check.sh builds for another GPU
# pytest-xdist and pytest-timeout (pure Python) for gpu_check.sh's test steps, which find
# them in pydeps/: the GPU machine's Python may not have them; its cores cut the suite's
# time several-fold, and a test that hangs is named and ended instead of taking the step.
deps="$out/pydeps"
if [ ! -d "$deps/xdist" ] || [ ! -f "$deps/pytest_timeout.py" ]; then
  wheels=$(mktemp -d)
  if "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
      -d "$wheels" pytest-xdist==3.8.0 execnet==2.1.2 pytest-timeout==2.4.0; then
    for w in "$wheels"/*.whl; do "$PY" -m zipfile -e "$w" "$deps"; done
  else
    echo "warning: pytest-xdist / pytest-timeout not downloaded; gpu_check.sh runs pytest" \
      "in one process, without per-test timeouts" >&2
  fi
  rm -rf "$wheels"
fi
ls -la "$out"
