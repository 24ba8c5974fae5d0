"""Thin driver: runs the CMake build and places libaddnorm and addnorm._C into the package.

Environment knobs: ADDNORM_BUILD_DIR (persistent CMake build folder, default build/cmake),
ADDNORM_BUILD_TESTS=1 (also build the GoogleTest suite), ADDNORM_CUDA=AUTO|ON|OFF,
TORCH_CUDA_ARCH_LIST (CUDA architectures, default 9.0), MAX_JOBS (parallel compile jobs).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11
        import torch

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        if getattr(self, "editable_mode", False) or self.inplace:
            # Editable install: the package is imported from python/, so build into it.
            out_dir = ROOT / "python" / "addnorm"
        build_dir = Path(os.environ.get("ADDNORM_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        # A build folder configured with another torch (or Python) keeps that torch's paths in
        # its CMake cache: configure it afresh.
        stamp, origin = build_dir / "addnorm_torch.txt", f"{sys.executable}\n{torch.__file__}\n"
        if stamp.exists() and stamp.read_text() != origin:
            print(f"addnorm: {build_dir} was configured for another torch or Python; reconfiguring")
            (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        # In a virtual environment its cmake and ninja (requirements.txt pins them) before
        # those on PATH (pip's isolated build environment puts its own first on PATH).
        tools = str(Path(sys.executable).parent) if sys.prefix != sys.base_prefix else None
        cmake = (tools and shutil.which("cmake", path=tools)) or "cmake"
        ninja = (tools and shutil.which("ninja", path=tools)) or shutil.which("ninja")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            *([f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []),
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DADDNORM_PYTHON_OUTPUT_DIR={out_dir}",
            f"-DADDNORM_BUILD_TESTS={'ON' if os.environ.get('ADDNORM_BUILD_TESTS') == '1' else 'OFF'}",
            f"-DADDNORM_CUDA={os.environ.get('ADDNORM_CUDA', 'AUTO')}",
        ]
        subprocess.check_call(configure)
        stamp.write_text(origin)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])
        if out_dir != ext_path.parent:  # setuptools expects the module at ext_path too
            ext_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out_dir / ext_path.name, ext_path)
            shutil.copy2(out_dir / "_build_info.py", ext_path.parent / "_build_info.py")


def torch_requirement():
    """The library links the torch it is built against, and refuses another release at import:
    a wheel requires that release (2.11.0 matches every 2.11.0+ build; the CUDA or CPU build
    is the index's choice). Without torch (metadata alone), any."""
    try:
        import torch
    except ImportError:
        return "torch"
    return f"torch=={torch.__version__.split('+')[0]}"


setup(
    name="addnorm",
    version=(ROOT / "VERSION").read_text().strip(),
    install_requires=[torch_requirement()],
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[CMakeExtension("addnorm._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
