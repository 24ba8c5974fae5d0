"""One-call conversion of an existing model to addnorm's modules."""

from torch import nn

from .encoder import TransformerEncoderLayer, _unsupported_reason
from .modules import LayerNorm, RMSNorm

# torch module type -> addnorm replacement. Exact types only: subclasses of torch's
# modules may change forward, and addnorm's own modules are subclasses too. Each
# replacement subclasses the type it replaces and adds no state, so the attribute layout
# is identical and a class swap is a complete conversion.
_REPLACEMENTS = {
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    nn.TransformerEncoderLayer: TransformerEncoderLayer,
}


def _convertible(module: nn.Module) -> bool:
    if type(module) not in _REPLACEMENTS:
        return False
    if type(module) is nn.TransformerEncoderLayer:
        # Layers the op cannot run (custom activation, ...) stay torch's.
        return _unsupported_reason(module) is None
    return True


def replace_modules(model: nn.Module) -> nn.Module:
    """Swap every ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.TransformerEncoderLayer`` (with
    relu or gelu activation) in ``model`` (including ``model`` itself) for addnorm's
    drop-in, in place, keeping weights, device and dtype. Returns ``model``."""
    for module in list(model.modules()):
        if _convertible(module):
            # Same object, new class: parameters, buffers, hooks, device, dtype kept as-is.
            module.__class__ = _REPLACEMENTS[type(module)]
    return model


__all__ = ["replace_modules"]
