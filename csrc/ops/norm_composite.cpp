// The public ops below autograd (CompositeExplicitAutograd: every backend and Meta): one
// call of _norm_fwd, which the dispatcher sends to the tensors' backend; and
// _dropout_matmul as _dropout_apply then matmul. Their autograd is in ops/norm_autograd.cpp.
// And rms_norm_float64_weight (ops/norm_public.h), which both kernels of rms_norm call.

#include <ATen/ops/matmul.h>
#include <ATen/ops/ones.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
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
  check_tensor_args(input, {{residual, "residual"}, {weight, "weight"}, {bias, "bias"},
                            {dropout_seed, "dropout_seed"}});
  const auto [w, b] = widened_params(weight, bias, input);
  auto outs = norm_fwd_op().call(
      input, residual, normalized_shape, w, b, eps, is_rms, return_residual, residual_in_fp32,
      dropout_p, dropout_seed);
  return {std::get<0>(outs), std::get<1>(outs)};
}

at::Tensor dropout_matmul_forward(const at::Tensor& probs, const at::Tensor& value,
                                  const at::Tensor& seed, double p) {
  check_dropout_matmul_inputs(probs, value);
  // One op: no autocast inside it (the product in the inputs' dtype, as the backward's).
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::matmul(dropout_apply_op().call(probs, seed, p, std::nullopt), value);
}

}  // namespace

at::Tensor rms_norm_float64_weight(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                                   const at::Tensor& weight, std::optional<double> eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("addnorm::rms_norm", "")
          .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef,
                            const std::optional<at::Tensor>&, std::optional<double>)>();
  const std::optional<at::Tensor> w = weight;  // (named: the check's list holds references)
  check_tensor_args(input, {{w, "weight"}});  // (a strided weight, before the ones)
  // (float16/bfloat16/float32 as float32; other input as it is, for the op to refuse)
  const auto t = input.scalar_type();
  const bool narrower = t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
  const at::Tensor x = narrower ? input.to(at::kFloat) : input;
  // (symbolic sizes stay symbolic: a traced hidden size is not made a constant)
  const at::Tensor ones =
      at::ones({}, weight.options().dtype(at::kFloat)).expand_symint(weight.sym_sizes());
  return op.call(x, normalized_shape, ones, eps).mul(weight).to(input.scalar_type());
}

TORCH_LIBRARY_IMPL(addnorm, CompositeExplicitAutograd, m) {
  register_public_norm_ops<&norm_forward>(m);
  m.impl("_dropout_matmul", &dropout_matmul_forward);
}

// Nested input below autograd (inference mode skips the Autograd kernels, which refuse it):
// the composite's input check refuses it by name, rather than the dispatcher.
TORCH_LIBRARY_IMPL(addnorm, NestedTensorCPU, m) {
  register_public_norm_ops<&norm_forward>(m);
}
TORCH_LIBRARY_IMPL(addnorm, NestedTensorCUDA, m) {
  register_public_norm_ops<&norm_forward>(m);
}

}  // namespace addnorm
