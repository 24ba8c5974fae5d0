"""addnorm: fused residual-add + LayerNorm / RMSNorm for PyTorch (CPU and CUDA).

Importing the package loads libaddnorm, which registers the ops in ``torch.ops.addnorm``.
"""

import torch  # noqa: F401  (loads libtorch before libaddnorm)

from . import _C  # noqa: F401  (registers torch.ops.addnorm.*)
from .functional import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .modules import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm
from .encoder import TransformerEncoderLayer
from .convert import replace_modules

__version__ = _C.version()


def cpu_capability() -> str:
    """The instruction set the CPU kernels run with: "AVX2" or "DEFAULT"."""
    return _C.cpu_capability()


def cuda_available() -> bool:
    """True when addnorm was built with CUDA kernels and a CUDA device is present."""
    return _C.built_with_cuda() and torch.cuda.is_available()


__all__ = [
    "AddLayerNorm",
    "AddRMSNorm",
    "LayerNorm",
    "RMSNorm",
    "TransformerEncoderLayer",
    "add_layer_norm",
    "add_rms_norm",
    "cpu_capability",
    "cuda_available",
    "layer_norm",
    "replace_modules",
    "rms_norm",
]
