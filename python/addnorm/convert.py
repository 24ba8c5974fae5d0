"""One-call conversion of an existing model to addnorm's modules."""

import warnings

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


def replace_modules(model: nn.Module) -> nn.Module:
    """Swap every ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.TransformerEncoderLayer`` (those
    the op can run; others stay torch's) in ``model`` (including ``model`` itself) for
    addnorm's drop-in, in place, keeping weights, device and dtype. Returns ``model``. A
    module left as it is (a layer the op cannot run, a subclass such as one that FSDP's
    ``fully_shard`` made: convert before wrapping) gets a warning naming why."""
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise TypeError("addnorm.replace_modules: model holds a ScriptModule, whose modules are "
                        "compiled: convert the nn.Module first, then script it")
    for module in list(model.modules()):
        kind, ours = type(module), type(module).__module__.split(".")[0] == __package__
        why = (_unsupported_reason(module) if kind is nn.TransformerEncoderLayer else None
               if kind in _REPLACEMENTS else "a subclass, whose forward may differ")
        if why is None:  # Same object, new class: parameters, hooks, device, dtype kept.
            module.__class__ = _REPLACEMENTS[kind]
        elif isinstance(module, tuple(_REPLACEMENTS)) and not ours:
            warnings.warn(f"addnorm.replace_modules: {kind.__name__} stays as it is: {why}")
    return model


__all__ = ["replace_modules"]
