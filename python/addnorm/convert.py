"""One-call conversion of an existing model to addnorm's modules."""

import warnings

import torch
from torch import nn

from .encoder import TransformerEncoderLayer, _unsupported_reason
from .modules import LayerNorm, RMSNorm

# torch module type -> addnorm replacement: exact types only (a subclass may change forward; addnorm's
# are subclasses too). Each subclasses the type it replaces and adds no state: a class swap converts.
_REPLACEMENTS = {nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm,
                 nn.TransformerEncoderLayer: TransformerEncoderLayer}


def replace_modules(model: nn.Module) -> nn.Module:
    """Swap every ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.TransformerEncoderLayer`` (those
    the op can run; others stay torch's) in ``model`` (including ``model`` itself) for
    addnorm's drop-in, in place, keeping weights, device and dtype. Returns ``model``. A
    module left as it is (a layer the op cannot run, a subclass such as one that FSDP's
    ``fully_shard`` made: convert before wrapping) gets a warning naming why."""
    modules = list(model.modules())
    if any(isinstance(m, torch.jit.ScriptModule) for m in modules):
        raise TypeError("addnorm.replace_modules: model holds a ScriptModule, whose modules are "
                        "compiled: convert the nn.Module first, then script it")
    if any(f"{type(m).__module__}.{type(m).__name__}" == "torch._dynamo.eval_frame.OptimizedModule"
           for m in modules):  # (Module.compile guards the class; torch.compile's wrapper does not)
        warnings.warn("addnorm.replace_modules: model holds a torch.compile'd module, whose graphs compiled "
                      "before the conversion keep running torch's modules: convert, then compile", stacklevel=2)
    for module in modules:
        kind, ours = type(module), type(module).__module__.split(".")[0] == __package__
        why = (_unsupported_reason(module) if kind is nn.TransformerEncoderLayer else None
               if kind in _REPLACEMENTS else "a subclass, whose forward may differ")
        if why is None:  # Same object, new class: parameters, hooks, device, dtype kept.
            module.__class__ = _REPLACEMENTS[kind]
        elif isinstance(module, tuple(_REPLACEMENTS)) and not ours:
            warnings.warn(f"addnorm.replace_modules: {kind.__name__} stays as it is: {why}")
    return model


__all__ = ["replace_modules"]
