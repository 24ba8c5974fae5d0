"""addnorm.TransformerEncoderLayer: a subclass of torch.nn.TransformerEncoderLayer (same
constructor, submodules, state_dict) whose forward is the op
torch.ops.addnorm.transformer_encoder_layer: torch's layer op for op with fused Add & Norm,
in training every dropout's mask from a seed of addnorm's (docs/encoder_layer.md). A layer
the op cannot run (e.g. a submodule subclassed, hooked, or in another training mode) runs
torch's forward, warning once. TorchScript compiles it (activation: activation_relu_or_gelu)."""

import inspect
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import _check_seed_can_be_drawn, _check_tensors
from .modules import LayerNorm


def _set(obj, name: str, cls) -> bool:  # set on obj, overridden or patched on the class since
    return not inspect.ismethod(getattr(obj, name)) or name in vars(obj) or getattr(  # import
        type(obj), name) is not _AS_IMPORTED.get((cls, name), getattr(cls, name))


def _overridden(m: nn.Module) -> bool:
    """Hooks, or a forward set on the instance: what the op, which reads parameters, skips."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or _set(m, "forward", type(m)))


def _activation_name(act) -> Optional[str]:
    """'relu' / 'gelu' for what the op runs (F.relu, torch.relu, F.gelu, plain nn.ReLU, nn.GELU())."""
    if isinstance(act, nn.Module) and _overridden(act):
        return None
    if act is F.relu or act is torch.relu or type(act) is nn.ReLU:
        return "relu"
    return "gelu" if act is F.gelu or (type(act) is nn.GELU and act.approximate == "none") else None


_ACTIVATION_CODES = {"relu": 1, "gelu": 2}  # (torch's layer's activation_relu_or_gelu; 0 for torch.relu)

# The submodules the op runs from their parameters alone: exactly these types (a subclass or
# a parametrization may change forward), without hooks. (parent, name, types)
_PLAIN = [("", n, (t,)) for n, t in (("self_attn", nn.MultiheadAttention), ("linear1", nn.Linear),
                                     ("linear2", nn.Linear), ("dropout", nn.Dropout),
                                     ("dropout1", nn.Dropout), ("dropout2", nn.Dropout))]
_PLAIN += [("self_attn", "out_proj", (nn.modules.linear.NonDynamicallyQuantizableLinear,)),
           ("", "norm1", (nn.LayerNorm, LayerNorm)), ("", "norm2", (nn.LayerNorm, LayerNorm))]
_AS_IMPORTED = {(t, n): getattr(t, n) for t, n in [(t, "forward") for *_, ts in _PLAIN for t in ts]
                + [(nn.ReLU, "forward"), (nn.GELU, "forward"), (nn.TransformerEncoderLayer, "_sa_block"),
                   (nn.TransformerEncoderLayer, "_ff_block")]}


def _unsupported_reason(layer: nn.TransformerEncoderLayer) -> Optional[str]:
    """Why the op, which reads the submodules' parameters, cannot run this layer (or None)."""
    if _activation_name(layer.activation) is None:
        return f"activation must be a plain relu or gelu, got {layer.activation!r}"
    for parent, leaf, types in _PLAIN:
        m = (layer._modules[parent]._modules if parent else layer._modules).get(leaf)
        if type(m) not in types:
            return f"{parent}.{leaf}".lstrip(".") + f" is a {type(m).__module__}.{type(m).__qualname__}, not plain"
        if _overridden(m):
            return f"{parent}.{leaf}".lstrip(".") + " has hooks or its own forward, not called"
    if any(_set(layer, n, nn.TransformerEncoderLayer) for n in ("_sa_block", "_ff_block")):
        return "_sa_block or _ff_block is overridden"
    sa = layer.self_attn
    if not sa._qkv_same_embed_dim or sa.bias_k is not None or sa.add_zero_attn:
        return "self_attn must be plain self-attention (no kdim/vdim, add_bias_kv, add_zero_attn)"
    p = layer.dropout.p
    if not (sa.dropout == p and layer.dropout1.p == p and layer.dropout2.p == p):
        return "every dropout probability of the layer must be equal"
    if p > 0 and any(layer._modules[n].training != layer.training
                     for n in ("self_attn", "dropout", "dropout1", "dropout2")):
        return "a dropout submodule's training mode differs from the layer's"
    n1, n2 = layer.norm1, layer.norm2
    if n1.eps != n2.eps or not n1.eps >= 0 or n1.weight is None or n2.weight is None:  # (weights)
        return "norm1 and norm2 must have the same non-negative eps and a weight (elementwise_affine=True)"
    return None


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """Drop-in for ``torch.nn.TransformerEncoderLayer`` (same constructor; activation relu or
    gelu: ``"relu"``, ``"gelu"``, ``F.relu``, ``torch.relu``, ``F.gelu``, ``nn.ReLU()``, ``nn.GELU()``)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                         batch_first, norm_first, bias, device, dtype)
        if _activation_name(self.activation) is None:  # (a subclass may override blocks)
            raise ValueError(f"addnorm.TransformerEncoderLayer: {_unsupported_reason(self)}")

    def __prepare_scriptable__(self) -> "TransformerEncoderLayer":
        # (torch.jit.script calls it.) The scripted forward reads activation_relu_or_gelu,
        # which must still describe the activation the layer holds.
        reason, name = _unsupported_reason(self), _activation_name(self.activation)
        code = getattr(self, "activation_relu_or_gelu", None)
        if reason is None and code != _ACTIVATION_CODES[name] and not (name == "relu" and code == 0):
            reason = (f"activation_relu_or_gelu must be {_ACTIVATION_CODES[name]} for activation "
                      f"{name}, got {code!r} (set it when replacing the activation)")
        if reason is not None:
            raise ValueError(f"addnorm.TransformerEncoderLayer cannot be scripted: {reason}")
        return self

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if not torch.jit.is_scripting():
            _check_tensors(src, src_mask, src_key_padding_mask)
        if src.is_nested:
            # (from nn.TransformerEncoder's inference fast path) torch's own fused kernel
            if not torch.jit.is_scripting():
                return super().forward(src, src_mask, src_key_padding_mask, is_causal)
            return self._nested_forward(src, src_mask, src_key_padding_mask)
        fast_path = torch.backends.mha.get_fastpath_enabled()  # (torch's: off with hooks on it)
        if torch.jit.is_scripting():
            activation = "gelu" if self.activation_relu_or_gelu == 2 else "relu"
            modes = [self.self_attn.training, self.dropout.training, self.dropout1.training,
                     self.dropout2.training]  # (p, eps and submodule types: fixed by scripting)
            if self.dropout.p > 0 and modes != [self.training] * 4:
                raise RuntimeError("addnorm.TransformerEncoderLayer (scripted): a dropout submodule's"
                                   " training mode differs from the layer's (eager: torch's forward)")
        else:
            g = nn.modules.module
            reason = _unsupported_reason(self) or (
                (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                 or g._global_backward_pre_hooks) and "global module hooks are registered")
            if reason:  # changed since construction: torch's forward calls the submodules
                if not torch.compiler.is_compiling() and getattr(self, "_fallback", None) != reason:
                    self._fallback = reason  # (a warning breaks a compiled graph)
                    warnings.warn(f"addnorm.TransformerEncoderLayer runs torch's forward: {reason}")
                return super().forward(src, src_mask, src_key_padding_mask, is_causal)
            activation = _activation_name(self.activation)
            fast_path = fast_path and not (self._forward_hooks or self._forward_pre_hooks)
            if self.training and self.dropout.p > 0:  # the op draws its dropouts' seeds
                _check_seed_can_be_drawn("the layer's dropout seeds", "Keep the budget at 1.")
        sa = self.self_attn
        return torch.ops.addnorm.transformer_encoder_layer(
            src, src_mask, src_key_padding_mask, bool(is_causal),
            sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
            self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
            self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias,
            sa.num_heads, self.dropout.p, activation, self.norm1.eps, sa.batch_first,
            self.norm_first, self.training, fast_path)

    def _nested_forward(self, src: Tensor, src_mask: Optional[Tensor],
                        src_key_padding_mask: Optional[Tensor]) -> Tensor:
        """The scripted forward's nested-tensor path: torch's fused inference kernel, as torch's layer."""
        sa = self.self_attn
        tensors: List[Optional[Tensor]] = [sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight,
                                           sa.out_proj.bias, self.norm1.weight, self.norm1.bias,
                                           self.norm2.weight, self.norm2.bias, self.linear1.weight,
                                           self.linear1.bias, self.linear2.weight, self.linear2.bias]
        needs_grad = torch.is_grad_enabled() and any([t is not None and t.requires_grad for t in tensors])
        if self.training or needs_grad or src_mask is not None or src_key_padding_mask is not None:
            raise RuntimeError("addnorm.TransformerEncoderLayer: nested tensor input is supported only "
                               "for inference (eval mode, no gradient, no masks), as in torch's layer")
        return torch._transformer_encoder_layer_fwd(
            src, sa.embed_dim, sa.num_heads, sa.in_proj_weight, sa.in_proj_bias,
            sa.out_proj.weight, sa.out_proj.bias, self.activation_relu_or_gelu == 2,
            self.norm_first, self.norm1.eps, self.norm1.weight, self.norm1.bias,
            self.norm2.weight, self.norm2.bias, self.linear1.weight, self.linear1.bias,
            self.linear2.weight, self.linear2.bias, None, None)


__all__ = ["TransformerEncoderLayer"]
