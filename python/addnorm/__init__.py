"""addnorm: fused residual-add + LayerNorm / RMSNorm for PyTorch (CPU and CUDA). Importing
the package loads libaddnorm, which registers the ops in ``torch.ops.addnorm``."""

import torch  # noqa: F401  (loads libtorch before libaddnorm)

from . import _build_info


def _check_torch_version() -> None:
    """libaddnorm links the torch it was built against (a CUDA build's, its CUDA major version's
    libraries): another fails to load it with undefined symbols or libraries. Say so, and how."""
    release = lambda v: v.split("+")[0]  # noqa: E731  (2.11.0+cu130 -> 2.11.0)
    built, cuda, now = _build_info.torch_version, getattr(_build_info, "torch_cuda", None), torch.version.cuda
    if release(built) != release(torch.__version__) or cuda and cuda.split(".")[0] != (now or "").split(".")[0]:
        raise ImportError(
            f"addnorm {_build_info.version} was built against torch {built} (CUDA {cuda or 'none'}), but "
            f"torch {torch.__version__} (CUDA {now or 'none'}) is installed: rebuild addnorm against it "
            "(`make build` in the source tree, or `pip install --no-build-isolation --no-deps --force-reinstall "
            f".`), or install torch {built} (torch=={release(built)} from the index that serves that build; in "
            "the source tree `pip install -c requirements.txt ...` keeps the pinned torch when installing others)")


_check_torch_version()

from . import _C  # noqa: E402,F401  (after the check: loads the library, registers torch.ops.addnorm.*)
from .functional import (  # noqa: E402
    add_layer_norm, add_rms_norm, dropout_mask, dropout_seed, layer_norm, rms_norm)
from .modules import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm  # noqa: E402
from .encoder import TransformerEncoderLayer  # noqa: E402
from .convert import replace_modules  # noqa: E402

__version__ = _C.version()
cpu_capability = _C.cpu_capability  # the CPU kernels' instruction set: AVX512, AVX2 or DEFAULT


def cuda_available() -> bool:
    """True when addnorm was built with CUDA kernels and a CUDA device is present."""
    return _C.built_with_cuda() and torch.cuda.is_available()


__all__ = ["AddLayerNorm", "AddRMSNorm", "LayerNorm", "RMSNorm", "TransformerEncoderLayer",
           "add_layer_norm", "add_rms_norm", "cpu_capability", "cuda_available", "dropout_mask",
           "dropout_seed", "layer_norm", "replace_modules", "rms_norm"]
