"""One-call conversion of an existing model to addnorm's modules."""

import warnings

import torch
from torch import nn

from .encoder import TransformerEncoderLayer, _unsupported_reason
from .modules import LayerNorm, RMSNorm

# torch module type -> addnorm replacement: exact types only (a subclass may change forward; addnorm's
# are subclasses too). Each subclasses the type it replaces and adds no state: a class swap converts.
_REPLACEMENTS = {nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm, nn.TransformerEncoderLayer: TransformerEncoderLayer}


def replace_modules(model: nn.Module) -> nn.Module:
    """Swap every ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.TransformerEncoderLayer`` (those the op
    can run; others stay torch's) in ``model`` (including ``model`` itself) for addnorm's drop-in, in
    place, keeping weights, device and dtype; returns ``model``. A module left (a layer the op cannot
    run, a norm with a negative or NaN eps, a subclass such as FSDP's ``fully_shard`` makes, a forward
    set on the instance: convert before wrapping) gets a warning naming it and why."""
    named = list(model.named_modules())
    if any(isinstance(m, torch.jit.ScriptModule) for _, m in named):
        raise TypeError("addnorm.replace_modules: model holds a ScriptModule (compiled): convert, then script it")
    if any(f"{type(m).__module__}.{type(m).__name__}" == "torch._dynamo.eval_frame.OptimizedModule"
           for _, m in named):  # (Module.compile guards the class; torch.compile's wrapper does not)
        warnings.warn("addnorm.replace_modules: model holds a torch.compile'd module, whose graphs compiled "
                      "before the conversion keep running torch's modules: convert, then compile", stacklevel=2)
    for name, module in named:  # (base: the class under a parametrization's, or the class)
        kind, base = type(module), nn.utils.parametrize.type_before_parametrizations(module)
        why = ("its forward is set on the instance (as accelerate's hooks do): convert first" if "forward" in
               vars(module) else _unsupported_reason(module) if kind is nn.TransformerEncoderLayer else
               ("its eps is negative or NaN, which the op refuses" if not (module.eps or 0) >= 0 else None)
               if kind in _REPLACEMENTS else "parametrized: convert, then parametrize" if base in _REPLACEMENTS
               else "a subclass, whose forward may differ")
        if why is None:  # Same object, new class: parameters, hooks, device, dtype kept.
            module.__class__ = _REPLACEMENTS[kind]
        elif isinstance(module, tuple(_REPLACEMENTS)) and base.__module__.split(".")[0] != __package__:
            warnings.warn(f"addnorm.replace_modules: {name or 'model'} ({kind.__module__}.{kind.__qualname__}) "
                          f"stays as it is: {why}", stacklevel=2)
    return model


__all__ = ["replace_modules"]
