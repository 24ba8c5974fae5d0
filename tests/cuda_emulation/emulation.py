"""Builds csrc/cuda/norm_kernels.cu as host C++ on the CUDA emulation of emu_cuda.h, so that
the CUDA kernels' logic runs (slowly) on a machine without a GPU.

The .cu file is rewritten mechanically: the CUDA runtime headers and the dispatcher
registration go, kernel launches ``k<<<grid, block, smem, stream>>>(args)`` become
``emu::launch(grid, block, smem, k, args)`` (the kernel's name noted: ``launched()``), the stream, device properties and occupancy
queries become constants (132 SMs, one resident CTA per SM), and the dynamic shared memory
declaration points at the emulator's buffer. norm_utils.cuh is inlined; static ``__shared__``
arrays are poisoned for each block, vector stores go through ``emu::store_vector`` (their
alignment checked), and ``ADDNORM_CUDA_MAX_GRID`` is read at every launch. The kernels' own
code is compiled as it is otherwise.
``load()`` builds (once per source change, in build/cuda_emulation or
$ADDNORM_EMULATION_BUILD_DIR) and returns a module
with ``norm_fwd`` / ``norm_bwd``, which take the internal ops' arguments on CPU tensors."""

import os
import re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.environ.get("ADDNORM_EMULATION_BUILD_DIR", os.path.join(ROOT, "build", "cuda_emulation"))

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.S)


def _split_top(s):
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "(<[" and 1 or 0
        depth -= ch in ")>]" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _replace(text, old, new, count=None):
    n = text.count(old)
    if n == 0 or (count is not None and n != count):
        raise RuntimeError(f"cuda emulation: expected {count or 'some'} of {old!r} in the "
                           f"kernels, found {n}: update tests/cuda_emulation/emulation.py")
    return text.replace(old, new)


def host_source(cu_text):
    """The host C++ translation of norm_kernels.cu's text."""
    t = '#include "emu_cuda.h"\n' + cu_text
    # norm_utils.cuh inlined, so that the rewrites below reach its code too
    with open(os.path.join(ROOT, "csrc", "cuda", "norm_utils.cuh")) as f:
        utils = _replace(f.read(), "#pragma once\n", "", 1)
    t = _replace(t, '#include "cuda/norm_utils.cuh"\n', utils, 1)
    t = _replace(t, "#include <ATen/cuda/CUDAContext.h>\n", "", 1)
    t = _replace(t, "#include <c10/cuda/CUDAGuard.h>\n", "", 1)
    t = _replace(t, '#include "ops/norm_register.h"\n', '#include "ops/norm_args.h"\n', 1)
    t = _replace(t, "extern __shared__ __align__(16) unsigned char dyn_smem[];",
                 "unsigned char* dyn_smem = emu::dyn_smem();", 1)
    t = _replace(t, "static_cast<int>(c10::cuda::current_device())", "0", 1)
    t = _replace(t, "C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor("
                    "&ctas, kernel, threads, smem));", "ctas = 1;", 1)
    t = _replace(t, "C10_CUDA_KERNEL_LAUNCH_CHECK();", "")
    t = _replace(t, "at::cuda::getCurrentCUDAStream()", "cudaStream_t{}")
    t = _replace(t, "at::cuda::getCurrentDeviceProperties()->multiProcessorCount",
                 "emu::sm_count()")
    t, n = re.subn(r"const c10::cuda::CUDAGuard guard\([^;]*\);", "", t)
    if n == 0:
        raise RuntimeError("cuda emulation: no CUDAGuard found: update emulation.py")
    # ADDNORM_CUDA_MAX_GRID read at every launch (the library reads it once), so that tests
    # can cap the grid and make each block walk several row groups.
    t = _replace(t, "static const int64_t cap = [] {", "const int64_t cap = [] {", 1)
    # Static __shared__ arrays poisoned for each block (emu::poison_shared).
    shared = t.count("__shared__")
    # (one array per declaration: `__shared__ float a[4], b[4];` is not matched, and fails)
    t, n = re.subn(r"(__shared__\s[^;{}(),]*?\b(\w+)\s*(?:\[[^\];,]*\])+;)",
                   r"\1 emu::poison_shared(\2, sizeof(\2));", t)
    if n == 0 or n != shared:
        raise RuntimeError(f"cuda emulation: {n} of {shared} __shared__ declarations rewritten: "
                           "update emulation.py")
    # Vector stores through emu::store_vector (their alignment checked).
    t, n = re.subn(r"\*reinterpret_cast<(Vec<[^;]*?>)\*>\((\w+)\) = (\w+);",
                   r"emu::store_vector(reinterpret_cast<\1*>(\2), \3);", t)
    if n == 0 or re.search(r"\*\s*reinterpret_cast<[^;]*\)\s*=[^=]", t) or t.count(
            "reinterpret_cast<Vec<") != t.count("emu::store_vector(reinterpret_cast<Vec<"):
        raise RuntimeError("cuda emulation: vector stores not rewritten: update emulation.py")

    def launch(m):  # (the kernel's name, as written, noted first: emu::launched)
        grid, block, smem = _split_top(m.group(2))[:3]
        name = " ".join(m.group(1).split())
        return (f'emu::note_launch("{name}"), emu::launch(dim3({grid}), dim3({block}), {smem}, '
                f"{m.group(1).strip()}, {m.group(3).strip()});")

    t, n = _LAUNCH.subn(launch, t)
    if n == 0 or "<<<" in t:
        raise RuntimeError("cuda emulation: kernel launches not rewritten: update emulation.py")
    i = t.index("TORCH_LIBRARY_IMPL(addnorm, CUDA, m)")
    j = t.index("\n}\n", i) + 3
    return t[:i] + ("void emu_norm_fwd(const NormFwdArgs& a) { norm_fwd(a); }\n"
                    "void emu_norm_bwd(const NormBwdArgs& a) { norm_bwd(a); }\n"
                    "void emu_dropout_apply(const DropoutApplyArgs& a) { dropout_apply(a); }\n") + t[j:]


def load(verbose=False):
    import logging
    import sys

    # the venv's ninja first (pinned with the build's dependencies)
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime"
    from torch.utils.cpp_extension import load as load_extension

    os.makedirs(BUILD, exist_ok=True)
    with open(os.path.join(ROOT, "csrc", "cuda", "norm_kernels.cu")) as f:
        src = host_source(f.read())
    path = os.path.join(BUILD, "norm_kernels_emulated.cpp")
    old = open(path).read() if os.path.exists(path) else None
    if old != src:  # (an unchanged file keeps its timestamp: no rebuild)
        with open(path, "w") as f:
            f.write(src)
    # ADDNORM_EMULATION_SANITIZE=1 (make sanitize): AddressSanitizer, so that a kernel's read
    # or write outside a tensor stops the run (python must preload the ASan runtime).
    asan = os.environ.get("ADDNORM_EMULATION_SANITIZE") == "1"
    san = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    # ADDNORM_EMULATION_CONTRACT=1: products and sums contracted into fma as nvcc does by
    # default (its -fmad=true; the rounded intrinsics stay unfused, as in nvcc), so that no
    # result is found to depend on the host compiler's not fusing.
    contract = os.environ.get("ADDNORM_EMULATION_CONTRACT") == "1"
    import platform
    fma = ["-mfma"] if platform.machine() in ("x86_64", "AMD64") else []  # (aarch64 has fma)
    fp = ["-ffp-contract=fast"] + fma if contract else ["-ffp-contract=off"]
    # ADDNORM_EMULATION_BWD_AHEAD=0: the backward loading a row at its start, as the library
    # built with CMake's ADDNORM_CUDA_BWD_AHEAD=OFF.
    ahead = os.environ.get("ADDNORM_EMULATION_BWD_AHEAD", "1") != "0"
    variant = ("_asan" if asan else "") + ("_contract" if contract else "") + ("" if ahead else "_noahead")
    build = BUILD + variant.replace("_", "-")
    os.makedirs(build, exist_ok=True)
    return load_extension(
        name="addnorm_cuda_emulation" + variant,
        sources=[os.path.join(HERE, "harness.cpp"), path,
                 os.path.join(ROOT, "csrc", "ops", "norm_launch.cpp"),
                 os.path.join(ROOT, "csrc", "ops", "norm_checks.cpp")],
        extra_include_paths=[HERE, os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include"),
                             os.path.join(_cuda_home(), "include")],
        extra_cflags=["-O2", "-DADDNORM_BUILDING_LIBRARY"] + fp + san
                     + ([] if ahead else ["-DADDNORM_CUDA_BWD_AHEAD=0"]),
        extra_ldflags=san, build_directory=build, verbose=verbose)


def _cuda_home():
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"


def available():
    """(True, "") when the emulation can be built here: a C++ compiler and the CUDA toolkit's
    host headers (vector_types.h, driver_types.h); else (False, why)."""
    import shutil
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return False, "no C++ compiler"
    inc = os.path.join(_cuda_home(), "include")
    if not os.path.exists(os.path.join(inc, "vector_types.h")):
        return False, f"no CUDA toolkit headers at {inc} (vector_types.h)"
    return True, ""
