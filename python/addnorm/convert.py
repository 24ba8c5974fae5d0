"""One-call conversion of an existing model to addnorm's modules."""

import torch
from torch import nn

from .encoder import TransformerEncoderLayer, _unsupported_reason
from .modules import LayerNorm, RMSNorm

# torch module type -> addnorm replacement. Exact types only: subclasses of torch's
# modules may change forward, and addnorm's own modules are subclasses too. Each
# replacement subclasses the type it replaces and adds no state, so the attribute layout
# is identical and a class swap is a complete conversion.
_REPLACEMENTS = {nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm,
                 nn.TransformerEncoderLayer: TransformerEncoderLayer}


def _convertible(module: nn.Module) -> bool:  # (layers the op cannot run stay torch's)
    return type(module) in _REPLACEMENTS and (
        type(module) is not nn.TransformerEncoderLayer or _unsupported_reason(module) is None)


def replace_modules(model: nn.Module) -> nn.Module:
    """Swap every ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.TransformerEncoderLayer`` (those
    the op can run; others stay torch's) in ``model`` (including ``model`` itself) for
    addnorm's drop-in, in place, keeping weights, device and dtype. Returns ``model``."""
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise TypeError("addnorm.replace_modules: model holds a ScriptModule, whose modules are "
                        "compiled: convert the nn.Module first, then script it")
    for module in list(model.modules()):
        if _convertible(module):
            # Same object, new class: parameters, buffers, hooks, device, dtype kept as-is.
            module.__class__ = _REPLACEMENTS[type(module)]
    return model


__all__ = ["replace_modules"]
