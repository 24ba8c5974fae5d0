"""nn.Module drop-ins: subclasses of torch's modules (constructor, parameters, state_dict,
extra_repr stay torch's) whose forward calls the ops (so ``torch.jit.script`` compiles them)."""

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F


def _check_p(p: float) -> float:
    if isinstance(p, (str, bytes, type(None))) or not 0.0 <= p <= 1.0:  # (no comparison's TypeError)
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p!r}")
    return float(p)


_CONSTANTS = ["return_residual", "residual_in_fp32", "dropout", "memory_efficient"]


def _extra_repr(base: type):  # (the add modules' extra_repr: base's, then the flags)
    return lambda m: ", ".join([base.extra_repr(m)] + [f"{k}={getattr(m, k)}" for k in _CONSTANTS])


class LayerNorm(nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``."""

    def forward(self, input: Tensor) -> Tensor:  # (TorchScript compiles the op's call there)
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm``."""

    def forward(self, input: Tensor) -> Tensor:  # (as LayerNorm)
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class AddLayerNorm(nn.LayerNorm):
    """``LayerNorm(dropout(input) + residual)``: ``forward(input, residual)`` returns what
    ``addnorm.add_layer_norm`` returns; ``dropout`` applies in training mode only.
    ``return_residual`` is a TorchScript constant (it fixes the scripted return type)."""

    __constants__ = nn.LayerNorm.__constants__ + _CONSTANTS

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, return_residual: bool = False,
                 residual_in_fp32: bool = False, dropout: float = 0.0,
                 memory_efficient: bool = False) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.return_residual, self.residual_in_fp32 = return_residual, residual_in_fp32
        self.dropout, self.memory_efficient = _check_p(dropout), memory_efficient

    # No return annotation: TorchScript infers Tensor or Tuple[Tensor, Tensor] from the
    # constant return_residual (an annotated Union would reach scripted callers as a Union).
    def forward(self, input: Tensor, residual: Optional[Tensor] = None):
        p = self.dropout if self.training or not 0.0 <= self.dropout <= 1.0 else 0.0  # (checked in eval too)
        if not torch.jit.is_scripting():  # (F: the op's call without torch.ops' overhead)
            return F._add_norm(False, input, residual, self.normalized_shape, self.weight,
                               self.bias, self.eps, self.return_residual, self.residual_in_fp32,
                               p, None, False, self.memory_efficient)
        out, h = torch.ops.addnorm.add_layer_norm(
            input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
            return_residual=self.return_residual, residual_in_fp32=self.residual_in_fp32,
            dropout_p=p, dropout_seed=F.dropout_seed(input.device) if 0.0 < p <= 1.0 else None,
            memory_efficient=self.memory_efficient)
        return (out, h) if self.return_residual else out

    extra_repr = _extra_repr(nn.LayerNorm)


class AddRMSNorm(nn.RMSNorm):
    """``RMSNorm(dropout(input) + residual)``; see ``AddLayerNorm``."""

    __constants__ = nn.RMSNorm.__constants__ + _CONSTANTS

    def __init__(self, normalized_shape, eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 return_residual: bool = False, residual_in_fp32: bool = False,
                 dropout: float = 0.0, memory_efficient: bool = False) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.return_residual, self.residual_in_fp32 = return_residual, residual_in_fp32
        self.dropout, self.memory_efficient = _check_p(dropout), memory_efficient

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):  # (see AddLayerNorm)
        p = self.dropout if self.training or not 0.0 <= self.dropout <= 1.0 else 0.0
        if not torch.jit.is_scripting():
            return F._add_norm(True, input, residual, self.normalized_shape, self.weight, None, self.eps,
                               self.return_residual, self.residual_in_fp32, p, None, False, self.memory_efficient)
        out, h = torch.ops.addnorm.add_rms_norm(
            input, residual, self.normalized_shape, self.weight, self.eps,
            return_residual=self.return_residual, residual_in_fp32=self.residual_in_fp32,
            dropout_p=p, dropout_seed=F.dropout_seed(input.device) if 0.0 < p <= 1.0 else None,
            memory_efficient=self.memory_efficient)
        return (out, h) if self.return_residual else out

    extra_repr = _extra_repr(nn.RMSNorm)


__all__ = ["AddLayerNorm", "AddRMSNorm", "LayerNorm", "RMSNorm"]
