// Autograd of the public norm ops, in C++ so that LibTorch programs get gradients too.
// Forward calls _norm_fwd below autograd and keeps (h, mean, rstd); backward calls
// _norm_bwd. Under torch.compile both internal ops land in the traced graphs.

#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "ops/norm_common.h"

namespace addnorm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

class NormFunction : public torch::autograd::Function<NormFunction> {
 public:
  // Returns {out, h}; h is an empty tensor unless return_residual. Used only when a
  // gradient can flow (see norm_autograd).
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& input,                    // [..., *normalized_shape]
      const std::optional<at::Tensor>& residual,  // like input, or absent
      c10::SymIntArrayRef normalized_shape,
      const std::optional<at::Tensor>& weight,    // [*normalized_shape] or absent
      const std::optional<at::Tensor>& bias,      // [*normalized_shape] or absent
      double eps,
      bool is_rms,
      bool return_residual,
      bool residual_in_fp32) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // an unused h gets no [M, N] zero gradient
    // Backward needs h; with a residual it exists only if we write it.
    const bool store_residual = return_residual || residual.has_value();
    auto [out, h, mean, rstd] = norm_fwd_op().call(
        input, residual, normalized_shape, weight, bias, eps, is_rms, store_residual,
        residual_in_fp32);
    // What was normalized: h when it was written (same dtype as h's gradient), else input.
    ctx->save_for_backward({store_residual ? h : input, mean, rstd, weight.value_or(at::Tensor())});
    ctx->saved_data["input_dtype"] = input.scalar_type();
    ctx->saved_data["residual_dtype"] =
        residual.has_value() ? residual->scalar_type() : input.scalar_type();
    ctx->saved_data["has_residual"] = residual.has_value();
    ctx->saved_data["has_bias"] = bias.has_value() && !is_rms;
    ctx->saved_data["bias_dtype"] = bias.has_value() ? bias->scalar_type() : input.scalar_type();
    ctx->saved_data["weight_grad"] = requires_grad(weight);
    ctx->saved_data["bias_grad"] = requires_grad(bias);
    ctx->saved_data["is_rms"] = is_rms;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["returned_h"] = return_residual;
    if (!return_residual) {
      h = at::empty({0}, h.options());
      ctx->mark_non_differentiable({h});
    }
    return {out, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];  // the tensor that was normalized
    const at::Tensor& mean = saved[1];
    const at::Tensor& rstd = saved[2];
    const at::Tensor& weight = saved[3];
    const auto input_dtype = ctx->saved_data["input_dtype"].toScalarType();
    const auto residual_dtype = ctx->saved_data["residual_dtype"].toScalarType();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool is_rms = ctx->saved_data["is_rms"].toBool();
    // _norm_bwd has no derivative of its own: refuse instead of returning wrong values.
    TORCH_CHECK(
        !at::GradMode::is_enabled() ||
            !(grad_outputs[0].requires_grad() || grad_outputs[1].requires_grad() ||
              x.requires_grad() || weight.requires_grad()),
        "addnorm: double backward (create_graph=True) is not supported");

    at::Tensor grad_out = grad_outputs[0];
    if (!grad_out.defined()) {
      grad_out = at::zeros_like(x, x.options().dtype(input_dtype));
    }
    std::optional<at::Tensor> grad_h_out;
    if (ctx->saved_data["returned_h"].toBool() && grad_outputs[1].defined()) {
      grad_h_out = grad_outputs[1];
    }
    std::optional<at::Tensor> w;
    if (weight.defined()) w = weight;
    const bool weight_grad = ctx->saved_data["weight_grad"].toBool();
    const bool bias_grad = has_bias && ctx->saved_data["bias_grad"].toBool();
    auto [grad_h, grad_weight, grad_bias] = norm_bwd_op().call(
        grad_out, grad_h_out, x, mean, rstd, w, bias_grad, is_rms, weight_grad,
        ctx->saved_data["eps"].toDouble());

    variable_list grads(9);  // one per forward argument after ctx
    grads[0] = grad_h.to(input_dtype);
    if (has_residual) grads[1] = grad_h.to(residual_dtype);
    if (weight_grad) grads[3] = grad_weight;
    if (bias_grad) grads[4] = grad_bias.to(ctx->saved_data["bias_dtype"].toScalarType());
    return grads;
  }
};

bool any_requires_grad(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || requires_grad(residual) || requires_grad(weight) ||
          requires_grad(bias));
}

// Without gradients: the forward below autograd, no graph node.
std::tuple<at::Tensor, at::Tensor> forward_without_grad(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool return_residual,
    bool residual_in_fp32) {
  at::AutoDispatchBelowADInplaceOrView guard;
  auto outs = norm_fwd_op().call(
      input, residual, normalized_shape, weight, bias, eps, is_rms, return_residual,
      residual_in_fp32);
  return {std::get<0>(outs), std::get<1>(outs)};
}

// The Autograd kernels: the graph node only when a gradient can flow.
std::tuple<at::Tensor, at::Tensor> norm_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool return_residual,
    bool residual_in_fp32) {
  if (!any_requires_grad(input, residual, weight, bias)) {
    return forward_without_grad(
        input, residual, normalized_shape, weight, bias, eps, is_rms, return_residual,
        residual_in_fp32);
  }
  auto outs = NormFunction::apply(
      input, residual, normalized_shape, weight, bias, eps, is_rms, return_residual,
      residual_in_fp32);
  return {outs[0], outs[1]};
}

at::Tensor layer_norm_autograd(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  return std::get<0>(norm_autograd(
      input, std::nullopt, normalized_shape, weight, bias, eps, false, false, false));
}

at::Tensor rms_norm_autograd(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, std::optional<double> eps) {
  return std::get<0>(norm_autograd(
      input, std::nullopt, normalized_shape, weight, std::nullopt,
      eps.value_or(default_rms_eps(input.scalar_type())), true, false, false));
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool return_residual,
    bool residual_in_fp32) {
  return norm_autograd(
      input, residual, normalized_shape, weight, bias, eps, false, return_residual,
      residual_in_fp32);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    std::optional<double> eps, bool return_residual, bool residual_in_fp32) {
  return norm_autograd(
      input, residual, normalized_shape, weight, std::nullopt,
      eps.value_or(default_rms_eps(input.scalar_type())), true, return_residual,
      residual_in_fp32);
}

}  // namespace

TORCH_LIBRARY_IMPL(addnorm, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("add_layer_norm", &add_layer_norm_autograd);
  m.impl("add_rms_norm", &add_rms_norm_autograd);
}

}  // namespace addnorm
