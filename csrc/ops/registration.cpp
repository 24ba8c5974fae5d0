// Every addnorm op schema, in one place. Kernels are registered next to their code:
// ops/norm.cpp (CPU, CUDA, CompositeExplicitAutograd), ops/norm_meta.cpp (Meta),
// ops/norm_autograd.cpp (Autograd).

#include <torch/library.h>

TORCH_LIBRARY(addnorm, m) {
  // LayerNorm over the trailing normalized_shape dims (F.layer_norm).
  m.def(
      "layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, "
      "Tensor? bias=None, float eps=1e-05) -> Tensor");
  // RMSNorm over the trailing normalized_shape dims (F.rms_norm).
  m.def(
      "rms_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, "
      "float? eps=None) -> Tensor");
  // Fused residual add + LayerNorm: h = input + residual; returns (layer_norm(h), h).
  m.def(
      "add_layer_norm(Tensor input, Tensor? residual, SymInt[] normalized_shape, "
      "Tensor? weight=None, Tensor? bias=None, float eps=1e-05, *, "
      "bool return_residual=True, bool residual_in_fp32=False) -> (Tensor, Tensor)");
  // Fused residual add + RMSNorm: h = input + residual; returns (rms_norm(h), h).
  m.def(
      "add_rms_norm(Tensor input, Tensor? residual, SymInt[] normalized_shape, "
      "Tensor? weight=None, float? eps=None, *, bool return_residual=True, "
      "bool residual_in_fp32=False) -> (Tensor, Tensor)");
  // Internal forward: (out, residual_out, mean, rstd); what backward needs.
  m.def(
      "_norm_fwd(Tensor input, Tensor? residual, SymInt[] normalized_shape, Tensor? weight, "
      "Tensor? bias, float eps, bool is_rms, bool store_residual, bool residual_in_fp32) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Internal backward: (grad_h, grad_weight, grad_bias).
  m.def(
      "_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor h, Tensor mean, "
      "Tensor rstd, Tensor? weight, bool has_bias, bool is_rms) -> (Tensor, Tensor, Tensor)");
}
