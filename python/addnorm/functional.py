"""Functional forms of the addnorm ops, with the signatures of torch.nn.functional.
TorchScript compiles ``layer_norm`` and ``rms_norm``, not ``add_layer_norm`` /
``add_rms_norm`` (their return type depends on ``return_residual``; docs/semantics.md)."""

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _C

_ShapeLike = Union[int, Sequence[int], torch.Size]


def _check_tensors(*tensors: Optional[Tensor]) -> None:
    """Refuses named tensors, as torch's norms do (not under torch.compile: no names)."""
    for t in tensors:
        if isinstance(t, Tensor) and not torch.compiler.is_compiling() and t.has_names():
            raise RuntimeError(f"addnorm: named tensors are not supported (got names {t.names}); drop the names "
                               "with tensor.rename(None), call the op, and set names on the result")


def _as_shape(shape: _ShapeLike) -> List[int]:  # (normalized_shape; no bools or floats, as torch's)
    # torch.jit.trace gives sizes as 0-dim tensors: the trace keeps their values (torch warns).
    val = lambda s: int(s) if torch.jit.is_tracing() and isinstance(s, Tensor) and s.dim() == 0 else s
    out = [val(shape)] if isinstance(val(shape), (int, torch.SymInt)) else [val(s) for s in shape] \
        if isinstance(shape, Sequence) and not isinstance(shape, (str, bytes)) else None  # (no Tensor)
    if out is None or any(isinstance(s, bool) or not hasattr(type(s), "__index__") for s in out):
        raise TypeError(f"addnorm: normalized_shape must be an int or a sequence of ints, got {shape!r}")
    return out


# The wrappers: _C where no Python code could see the call, if it takes it (else NotImplemented).
def layer_norm(input: Tensor, normalized_shape: _ShapeLike, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Same as ``torch.nn.functional.layer_norm``; also bf16/fp16 input with fp32 weight/bias."""
    if not torch.compiler.is_compiling() and not torch._C._has_torch_function((input, weight, bias)) and (
            out := _C.layer_norm(input, normalized_shape, weight, bias, eps)) is not NotImplemented:
        return out
    _check_tensors(input, weight, bias)
    if isinstance(input, Tensor) and input.is_nested:  # (torch's kernel takes nested tensors)
        return torch.nn.functional.layer_norm(input, _as_shape(normalized_shape), weight, bias, eps)
    return torch.ops.addnorm.layer_norm(input, _as_shape(normalized_shape), weight, bias, eps)


def rms_norm(input: Tensor, normalized_shape: _ShapeLike, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """Same as ``torch.nn.functional.rms_norm`` (eps=None: float32's eps, float64's for float64)."""
    if not torch.compiler.is_compiling() and not torch._C._has_torch_function((input, weight)) and (
            out := _C.rms_norm(input, normalized_shape, weight, eps)) is not NotImplemented:
        return out
    _check_tensors(input, weight)
    shape = _as_shape(normalized_shape)
    if isinstance(input, Tensor) and input.is_nested:  # (as layer_norm)
        return torch.nn.functional.rms_norm(input, shape, weight, eps)
    return torch.ops.addnorm.rms_norm(input, shape, weight, eps)


# What torch.jit.script compiles in place of layer_norm and rms_norm (the hook it calls on
# functions): the same ops with TorchScript's types (normalized_shape: List[int]).
def _layer_norm_scripted(input: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    return torch.ops.addnorm.layer_norm(input, normalized_shape, weight, bias, eps)


def _rms_norm_scripted(input: Tensor, normalized_shape: List[int],
                       weight: Optional[Tensor] = None, eps: Optional[float] = None) -> Tensor:
    return torch.ops.addnorm.rms_norm(input, normalized_shape, weight, eps)


layer_norm.__prepare_scriptable__ = lambda: _layer_norm_scripted
rms_norm.__prepare_scriptable__ = lambda: _rms_norm_scripted


def dropout_seed(device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
    """The seed of one fused-dropout call (int64 ``[2]`` on ``device``), drawn from ``generator``."""
    if not torch.jit.is_scripting():
        _check_seed_can_be_drawn(explicit_generator=generator is not None)
    return torch.randint(0, 9223372036854775807, [2], generator=generator, device=device)  # 2^63-1


def _check_seed_can_be_drawn(what: str = "the fused dropout's seed", fix: str = (
        "Draw it outside (seed = addnorm.dropout_seed(device)) and pass it to torch.ops."
        "addnorm.add_layer_norm / add_rms_norm(..., dropout_seed=seed)"),
        explicit_generator: bool = False) -> None:
    if torch.compiler.is_compiling() or torch._guards.TracingContext.try_get() is not None:
        from torch._functorch import config as functorch_config
        if functorch_config.activation_memory_budget < 1.0:  # (not in the message: with dynamic=True a
            raise RuntimeError(  # symbolic float, whose formatting broke the graph before the raise)
                f"addnorm: {what} cannot be drawn inside a graph compiled with "
                f"activation_memory_budget < 1 (torch.compile may recompute the draw in "
                f"backward with fresh randomness: gradients of another mask). {fix}")
    elif explicit_generator and torch._C._current_graph_task_id() != -1:
        fix = fix.replace("(device)", "(device, generator)")
        raise RuntimeError(f"addnorm: {what} drawn from an explicit generator in a backward "
                           "pass (activation checkpointing restores only the default generators "
                           f"for its recompute: another mask). {fix}")


def dropout_mask(seed: Tensor, size: List[int], p: float) -> Tensor:
    """The keep-mask (bool, shape ``size``, on the seed's device) of ``seed`` and ``p``: the
    elements ``add_layer_norm(..., dropout_p=p)`` keeps. For tests and debugging."""
    return torch.ops.addnorm._dropout_apply(torch.ones(size, device=seed.device), seed, p) != 0


def _add_norm(rms: bool, input: Tensor, residual: Optional[Tensor], normalized_shape: _ShapeLike,
              weight: Optional[Tensor], bias: Optional[Tensor], eps: Optional[float],
              return_residual: bool, residual_in_fp32: bool, dropout_p: Optional[float],
              generator: Optional[torch.Generator], return_dropout_mask: bool,
              memory_efficient: bool):
    # (dropout_p's default is None: torch.compile(dynamic=True) traces a float one as symbolic)
    dropout_p = 0.0 if dropout_p is None else dropout_p
    if generator is not None and not isinstance(generator, torch.Generator):  # (any dropout_p)
        raise TypeError(f"addnorm: generator must be a torch.Generator or None, got {generator!r}")
    seed, out_h, tensors = None, NotImplemented, (input, residual, weight, bias)
    try:
        drop = 0 < dropout_p <= 1
    except TypeError:  # (a str, say: the comparison's message would not name dropout_p)
        raise TypeError(f"addnorm: dropout_p must be a float or None, got {dropout_p!r}") from None
    if drop and torch.overrides.is_tensor_like(input):  # (Python's checks first: refused, no draw)
        _as_shape(normalized_shape)
        _check_tensors(*tensors)
        seed = dropout_seed(input.device, generator)
    head = (input, residual, normalized_shape, weight) + (() if rms else (bias,)) + (eps,)
    if not torch.compiler.is_compiling() and not torch._C._has_torch_function(tensors):
        out_h = (_C.add_rms_norm if rms else _C.add_layer_norm)(
            *head, return_residual, residual_in_fp32, dropout_p, seed, memory_efficient)
    if out_h is NotImplemented:  # (torch.ops: the flags are keyword-only)
        shape = _as_shape(normalized_shape)  # (checked before the names)
        _check_tensors(*tensors)
        if isinstance(input, Tensor) and input.is_nested:  # (inference mode skips the op's check)
            raise RuntimeError("addnorm: input must be a strided tensor, got a nested tensor (the "
                               "add ops take none: apply them to a jagged tensor's values())")
        op = torch.ops.addnorm.add_rms_norm if rms else torch.ops.addnorm.add_layer_norm
        out_h = op(*head[:2], shape, *head[3:], return_residual=return_residual,
                   residual_in_fp32=residual_in_fp32, dropout_p=dropout_p, dropout_seed=seed,
                   memory_efficient=memory_efficient)
    out, h = out_h
    if not return_dropout_mask:
        return (out, h) if return_residual else out
    mask = dropout_mask(seed, list(input.shape), dropout_p) if seed is not None else (
        torch.ones(input.shape, dtype=torch.bool, device=input.device))
    return (out, h, mask) if return_residual else (out, mask)


def add_layer_norm(input: Tensor, residual: Optional[Tensor], normalized_shape: _ShapeLike,
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, *, return_residual: bool = False,
                   residual_in_fp32: bool = False, dropout_p: Optional[float] = None,
                   generator: Optional[torch.Generator] = None, return_dropout_mask: bool = False,
                   memory_efficient: bool = False) -> Union[Tensor, Tuple[Tensor, ...]]:
    """``h = dropout(input, dropout_p) + residual; out = layer_norm(h)`` in one pass.

    Returns ``out``, or ``(out, h)`` with ``return_residual=True`` (pre-LN models carry h to
    the next layer); h has the residual's dtype, or float32 with ``residual_in_fp32``.
    ``dropout_p > 0`` drops input elements (always: pass 0 or None in eval) with a mask drawn
    from ``generator``, never stored (backward regenerates it; ``return_dropout_mask=True``
    appends it). ``memory_efficient=True``: autograd keeps ``out``, not h (docs/training.md)."""
    return _add_norm(False, input, residual, normalized_shape, weight, bias, eps,
                     return_residual, residual_in_fp32, dropout_p, generator,
                     return_dropout_mask, memory_efficient)


def add_rms_norm(input: Tensor, residual: Optional[Tensor], normalized_shape: _ShapeLike,
                 weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
                 return_residual: bool = False, residual_in_fp32: bool = False,
                 dropout_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 return_dropout_mask: bool = False,
                 memory_efficient: bool = False) -> Union[Tensor, Tuple[Tensor, ...]]:
    """``h = dropout(input, dropout_p) + residual; out = rms_norm(h)``; see ``add_layer_norm``."""
    return _add_norm(True, input, residual, normalized_shape, weight, None, eps,
                     return_residual, residual_in_fp32, dropout_p, generator,
                     return_dropout_mask, memory_efficient)


# torch.jit.script raises "TorchScript error: <message>" for functions carrying this.
_NOT_SCRIPTABLE = ("addnorm.{name} cannot be compiled by TorchScript (keyword-only arguments, "
                   "and a return type that depends on return_residual); in scripted code use "
                   "addnorm.{module} or torch.ops.addnorm.{name}, which returns (out, h)")
add_layer_norm.__script_unsupported = _NOT_SCRIPTABLE.format(name="add_layer_norm", module="AddLayerNorm")
add_rms_norm.__script_unsupported = _NOT_SCRIPTABLE.format(name="add_rms_norm", module="AddRMSNorm")


__all__ = ["add_layer_norm", "add_rms_norm", "dropout_mask", "dropout_seed", "layer_norm", "rms_norm"]
