// Meta kernels of the internal ops: the same checks and output shapes as the device
// kernels, with symbolic sizes, so torch.compile and torch.export trace them. The public
// ops reach these through their CompositeExplicitAutograd kernels.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/norm_checks.h"

namespace addnorm {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_meta(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool store_residual,
    bool residual_in_fp32, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const auto plan = check_norm_fwd_inputs(
      input, residual, normalized_shape, weight, bias, eps, residual_in_fp32, dropout_p,
      dropout_seed);
  return empty_norm_fwd_outputs(input, plan, is_rms, store_residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd_meta(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, bool has_bias, bool is_rms, bool weight_grad,
    std::optional<double> eps, bool from_output, const std::optional<at::Tensor>& bias,
    std::optional<c10::ScalarType> h_dtype, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool grad_h_wanted) {
  const NormPlan plan = check_norm_bwd_inputs(
      grad_out, grad_residual_out, h, mean, rstd, weight, is_rms, eps, from_output, bias,
      h_dtype, dropout_p, dropout_seed, grad_h_wanted);
  return empty_norm_bwd_outputs(h, weight, has_bias, weight_grad, plan, dropout_p > 0.0,
                                grad_h_wanted);
}

at::Tensor dropout_apply_meta(
    const at::Tensor& input, const at::Tensor& seed, double p,
    std::optional<c10::ScalarType> dtype) {
  const auto out = check_dropout_apply_inputs(input, seed, p, dtype);
  return at::empty_symint(input.sym_sizes(), input.options().dtype(out));
}

}  // namespace

TORCH_LIBRARY_IMPL(addnorm, Meta, m) {
  m.impl("_norm_fwd", &norm_fwd_meta);
  m.impl("_norm_bwd", &norm_bwd_meta);
  m.impl("_dropout_apply", &dropout_apply_meta);
}

}  // namespace addnorm
