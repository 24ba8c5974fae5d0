"""nn.Module drop-ins. LayerNorm and RMSNorm subclass torch's modules, so constructor,
parameters, state_dict keys, extra_repr and isinstance checks stay exactly torch's; only
forward runs addnorm's kernels."""

from typing import Optional, Tuple, Union

from torch import Tensor, nn

from . import functional as F


class LayerNorm(nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class AddLayerNorm(nn.LayerNorm):
    """``LayerNorm(input + residual)``; ``forward(input, residual)`` returns what
    ``addnorm.add_layer_norm`` returns (``(out, h)`` with ``return_residual=True``)."""

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        return_residual: bool = False,
        residual_in_fp32: bool = False,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.return_residual = return_residual
        self.residual_in_fp32 = residual_in_fp32

    def forward(
        self, input: Tensor, residual: Optional[Tensor] = None
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        return F.add_layer_norm(
            input,
            residual,
            self.normalized_shape,
            self.weight,
            self.bias,
            self.eps,
            return_residual=self.return_residual,
            residual_in_fp32=self.residual_in_fp32,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, return_residual={self.return_residual}, "
            f"residual_in_fp32={self.residual_in_fp32}"
        )


class AddRMSNorm(nn.RMSNorm):
    """``RMSNorm(input + residual)``; see ``AddLayerNorm``."""

    def __init__(
        self,
        normalized_shape,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        return_residual: bool = False,
        residual_in_fp32: bool = False,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.return_residual = return_residual
        self.residual_in_fp32 = residual_in_fp32

    def forward(
        self, input: Tensor, residual: Optional[Tensor] = None
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        return F.add_rms_norm(
            input,
            residual,
            self.normalized_shape,
            self.weight,
            self.eps,
            return_residual=self.return_residual,
            residual_in_fp32=self.residual_in_fp32,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, return_residual={self.return_residual}, "
            f"residual_in_fp32={self.residual_in_fp32}"
        )


__all__ = ["AddLayerNorm", "AddRMSNorm", "LayerNorm", "RMSNorm"]
