"""The package itself: its version has one source, and importing it against another torch
than the one its library was built against fails with a message that says what to do
(before loading the library, which would fail with undefined symbols)."""

import os
import re
import subprocess
import sys

import pytest
import torch

import addnorm
from addnorm import _build_info

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_version_has_one_source():
    with open(os.path.join(ROOT, "VERSION")) as f:
        version = f.read().strip()
    assert addnorm.__version__ == version  # from the library (CMake's PROJECT_VERSION)
    assert _build_info.version == version


def test_built_against_this_torch():
    assert (_build_info.torch_version, _build_info.torch_cuda) == (torch.__version__, torch.version.cuda)


def test_distribution_requires_the_torch_release_built_against():
    """The installed metadata pins the release of the torch the library was built against:
    pip then installs that release, instead of leaving the import to refuse another one."""
    from importlib import metadata

    try:
        requires = metadata.requires("addnorm")
    except metadata.PackageNotFoundError:
        pytest.skip("addnorm is imported from the source tree, not installed")
    assert requires == [f"torch=={_build_info.torch_version.split('+')[0]}"]


@pytest.mark.parametrize("built", ["2.12.1+cu130", "2.10.0"])
def test_other_torch_is_refused_with_a_clear_message(monkeypatch, built):
    monkeypatch.setattr(_build_info, "torch_version", built)
    with pytest.raises(ImportError) as err:
        addnorm._check_torch_version()
    msg = str(err.value)
    assert f"built against torch {built} (CUDA {_build_info.torch_cuda or 'none'}), " in msg
    assert f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) is installed" in msg
    assert "make build" in msg and "pip install" in msg


def test_same_release_other_build_is_accepted(monkeypatch):
    """2.11.0+cpu vs 2.11.0+cu130: the same release's ABI."""
    release = torch.__version__.split("+")[0]
    for build in ("+other", "+cpu", "+custom"):
        monkeypatch.setattr(_build_info, "torch_version", release + build)
        addnorm._check_torch_version()


@pytest.mark.parametrize("built, running", [("13.0", None), ("13.0", "12.8"), ("12.6", "13.0")])
def test_other_cuda_major_is_refused(monkeypatch, built, running):
    """A library built against a CUDA torch (even without addnorm's CUDA kernels) links that
    CUDA major version's libraries (torch's, libcudart.so.13), which a CPU-only torch or
    another major's build of the same release lacks: refused with the message, not a loader
    error, whatever the version tags say (2.11.0+cu130, a local build's 2.11.0)."""
    release = torch.__version__.split("+")[0]
    monkeypatch.setattr(torch.version, "cuda", running)
    running_tag = "+cu" + running.replace(".", "") if running else "+cpu"
    for tags in (("+cu" + built.replace(".", ""), running_tag), ("", "")):
        monkeypatch.setattr(_build_info, "torch_version", release + tags[0])
        monkeypatch.setattr(_build_info, "torch_cuda", built)
        monkeypatch.setattr(torch, "__version__", release + tags[1])
        with pytest.raises(ImportError, match=rf"built against torch {release}{re.escape(tags[0])} \(CUDA "
                                              rf"{built}\), but torch {release}{re.escape(tags[1])} \(CUDA {running or 'none'}\)"
                                              rf" is installed.*install torch {release}{re.escape(tags[0])} "
                                              rf"\(torch=={release} from the index that serves that build"):
            addnorm._check_torch_version()
    monkeypatch.setattr(torch.version, "cuda", built[:-1] + "9")  # (a newer minor: the same libraries)
    addnorm._check_torch_version()
    monkeypatch.setattr(_build_info, "torch_cuda", None)  # (a CPU build's library runs on any)
    for running in (None, "12.8", "13.0"):
        monkeypatch.setattr(torch.version, "cuda", running)
        addnorm._check_torch_version()
    monkeypatch.delattr(_build_info, "torch_cuda")  # (a build before the CUDA version was recorded)
    addnorm._check_torch_version()


def test_import_fails_before_loading_the_library(tmp_path):
    """A copy of the package whose _build_info names another torch: `import addnorm`
    raises the ImportError, not an undefined-symbol error from loading _C."""
    import shutil

    pkg = tmp_path / "addnorm"
    shutil.copytree(os.path.dirname(addnorm.__file__), pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "_build_info.py").write_text('version = "0"\ntorch_version, torch_cuda = "1.0.0", None\n')
    code = "import addnorm"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert res.returncode != 0
    assert "ImportError: addnorm 0 was built against torch 1.0.0" in res.stderr


def test_compile_caches_are_keyed_on_this_library(tmp_path):
    """torch.compile's FX graph and AOTAutograd caches key graphs on their text, not on the
    code of the custom ops in them; importing addnorm appends its library's identity (a
    hash of the file's bytes) to torch.compiler.config.cache_key_tag, which those keys
    include, after a tag the user set. A copy of the package: the same library bytes with
    another modification time give the same tag; other bytes (one appended, which the
    loader ignores) another one; and the AOTAutograd/FX cache key follows the tag."""
    import shutil

    from torch._inductor.codecache import FxGraphHashDetails

    tag = torch.compiler.config.cache_key_tag
    assert tag.split(";")[-1].startswith("addnorm:") and tag.count("addnorm:") == 1
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    details = FxGraphHashDetails(gm, [torch.zeros(2)], {}, [])
    with torch.compiler.config.patch(cache_key_tag=""):
        assert FxGraphHashDetails(gm, [torch.zeros(2)], {}, []).cache_key_tag != details.cache_key_tag
    pkg = tmp_path / "addnorm"
    shutil.copytree(os.path.dirname(addnorm.__file__), pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = "import torch, addnorm; print(torch.compiler.config.cache_key_tag)"

    def tag_of_copy():
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(tmp_path),
                                  "TORCH_COMPILE_CACHE_KEY_TAG": "mine"})
        return res.stdout.strip()

    lib = pkg / "libaddnorm.so"
    first = tag_of_copy()
    assert first == "mine;" + tag.split(";")[-1]
    st = os.stat(lib)
    os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert tag_of_copy() == first
    with open(lib, "ab") as f:
        f.write(b"\0")
    other = tag_of_copy()
    assert other.startswith("mine;addnorm:") and other != first


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"addnorm::{op}", key)


def test_backends_are_chosen_by_registration():
    """The dispatcher picks the backend (docs/architecture.md): the internal ops have a CPU
    kernel, a CUDA kernel exactly when the library was built with its CUDA sources, and a
    Meta kernel; the public ops have no per-device kernel, only the composite over the
    internal op and their autograd."""
    for op in ("_norm_fwd", "_norm_bwd"):
        assert _has_kernel(op, "CPU")
        assert _has_kernel(op, "Meta")
        assert _has_kernel(op, "CUDA") == addnorm._C.built_with_cuda()
    for op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        assert not _has_kernel(op, "CPU") and not _has_kernel(op, "CUDA")
        assert _has_kernel(op, "CompositeExplicitAutograd")
        assert _has_kernel(op, "Autograd")


def test_install_check(capsys):
    """`python -m addnorm` passes here (exit status 0, a parity line per op on the CPU) and
    describes itself in --help, also under -OO (which drops docstrings)."""
    from addnorm import __main__ as check

    assert check.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS  cpu") == 4 and out.endswith("install check: OK\n"), out
    for flags in ([], ["-OO"]):
        res = subprocess.run([sys.executable, *flags, "-m", "addnorm", "--help"], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(
                                 addnorm.__file__))})
        assert res.returncode == 0 and res.stdout.startswith("usage: python -m addnorm"), res.stderr
        assert ("short install check" in res.stdout) == (not flags) and "``" not in res.stdout
