"""One-call conversion of an existing model to addnorm's modules."""

from torch import nn

from .modules import LayerNorm, RMSNorm

# torch module type -> addnorm replacement. Exact types only: subclasses of torch's
# modules may change forward, and addnorm's own modules are subclasses too.
_REPLACEMENTS = {nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm}


def _convert(module: nn.Module) -> nn.Module:
    new_cls = _REPLACEMENTS[type(module)]
    # Same object, new class: parameters, buffers, hooks, device and dtype are kept as-is.
    module.__class__ = new_cls
    return module


def replace_modules(model: nn.Module) -> nn.Module:
    """Swap every ``nn.LayerNorm`` and ``nn.RMSNorm`` in ``model`` (including ``model``
    itself) for addnorm's drop-in, in place, keeping weights, device and dtype. Returns
    ``model``."""
    for module in model.modules():
        if type(module) in _REPLACEMENTS:
            _convert(module)
    return model


__all__ = ["replace_modules"]
