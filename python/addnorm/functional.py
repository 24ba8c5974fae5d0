"""Functional forms of the addnorm ops, with the signatures of torch.nn.functional.

TorchScript: ``layer_norm`` and ``rms_norm`` compile as their torch.nn.functional
counterparts do (normalized_shape a list or tuple of ints). ``add_layer_norm`` and
``add_rms_norm`` do not compile (keyword-only arguments, and a return type that depends on
``return_residual``); scripted code uses ``AddLayerNorm`` / ``AddRMSNorm`` or the ops
``torch.ops.addnorm.add_layer_norm`` / ``add_rms_norm``, which always return ``(out, h)``.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

_ShapeLike = Union[int, Sequence[int], torch.Size]


def _check_unnamed(*tensors: Optional[Tensor]) -> None:
    """Named tensors get torch's answer for its own norms, not the TorchScript conversion's
    message that torch.ops would give. (Not under torch.compile, which traces no names.)"""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None and t.has_names():
            raise RuntimeError(
                f"addnorm: named tensors are not supported (got names {t.names}); drop the "
                "names with tensor.rename(None), call the op, and set names on the result")


def _as_shape(normalized_shape: _ShapeLike) -> List[int]:
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return list(normalized_shape)


def layer_norm(
    input: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Same as ``torch.nn.functional.layer_norm``; also takes bf16/fp16 input with fp32
    weight and bias."""
    _check_unnamed(input, weight, bias)
    return torch.ops.addnorm.layer_norm(input, _as_shape(normalized_shape), weight, bias, eps)


def rms_norm(
    input: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """Same as ``torch.nn.functional.rms_norm`` (eps=None: the epsilon of the float type
    torch computes in, float32 for fp16/bf16/fp32 input)."""
    _check_unnamed(input, weight)
    return torch.ops.addnorm.rms_norm(input, _as_shape(normalized_shape), weight, eps)


# What torch.jit.script compiles in place of layer_norm and rms_norm (through the
# __prepare_scriptable__ hook it calls on functions): the same ops with TorchScript's
# types, normalized_shape being a List[int] as in torch.nn.functional.
def _layer_norm_scripted(
    input: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    return torch.ops.addnorm.layer_norm(input, normalized_shape, weight, bias, eps)


def _rms_norm_scripted(
    input: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    return torch.ops.addnorm.rms_norm(input, normalized_shape, weight, eps)


layer_norm.__prepare_scriptable__ = lambda: _layer_norm_scripted
rms_norm.__prepare_scriptable__ = lambda: _rms_norm_scripted


def add_layer_norm(
    input: Tensor,
    residual: Optional[Tensor],
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    return_residual: bool = False,
    residual_in_fp32: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``h = input + residual; out = layer_norm(h)`` in one pass.

    Returns ``out``, or ``(out, h)`` with ``return_residual=True`` (pre-LN models carry h
    to the next layer). h has the residual's dtype, or float32 with ``residual_in_fp32``.
    """
    _check_unnamed(input, residual, weight, bias)
    out, h = torch.ops.addnorm.add_layer_norm(
        input, residual, _as_shape(normalized_shape), weight, bias, eps,
        return_residual=return_residual, residual_in_fp32=residual_in_fp32)
    return (out, h) if return_residual else out


def add_rms_norm(
    input: Tensor,
    residual: Optional[Tensor],
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    return_residual: bool = False,
    residual_in_fp32: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``h = input + residual; out = rms_norm(h)`` in one pass; see ``add_layer_norm``."""
    _check_unnamed(input, residual, weight)
    out, h = torch.ops.addnorm.add_rms_norm(
        input, residual, _as_shape(normalized_shape), weight, eps,
        return_residual=return_residual, residual_in_fp32=residual_in_fp32)
    return (out, h) if return_residual else out


# torch.jit.script raises "TorchScript error: <message>" for functions carrying this.
_NOT_SCRIPTABLE = (
    "addnorm.{name} cannot be compiled by TorchScript (keyword-only arguments, and a "
    "return type that depends on return_residual); in scripted code use addnorm.{module} "
    "or torch.ops.addnorm.{name}, which returns (out, h)"
)
add_layer_norm.__script_unsupported = _NOT_SCRIPTABLE.format(name="add_layer_norm", module="AddLayerNorm")
add_rms_norm.__script_unsupported = _NOT_SCRIPTABLE.format(name="add_rms_norm", module="AddRMSNorm")


__all__ = ["add_layer_norm", "add_rms_norm", "layer_norm", "rms_norm"]
