// The public ops below autograd (CompositeExplicitAutograd: every backend and Meta): one
// call of _norm_fwd, which the dispatcher sends to the tensors' backend. Their autograd is
// in ops/norm_autograd.cpp.

#include <torch/library.h>

#include "ops/norm_public.h"

namespace addnorm {
namespace {

std::tuple<at::Tensor, at::Tensor> norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool return_residual,
    bool residual_in_fp32, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    bool /*memory_efficient: what autograd keeps*/) {
  check_input_defined(input);
  auto outs = norm_fwd_op().call(
      input, residual, normalized_shape, weight, bias, eps, is_rms, return_residual,
      residual_in_fp32, dropout_p, dropout_seed);
  return {std::get<0>(outs), std::get<1>(outs)};
}

}  // namespace

TORCH_LIBRARY_IMPL(addnorm, CompositeExplicitAutograd, m) {
  register_public_norm_ops<&norm_forward>(m);
}

}  // namespace addnorm
