// launch_norm_fwd / launch_norm_bwd (ops/norm_launch.h): from the internal ops' arguments
// to a backend kernel's args struct and back.

#include <limits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>

#include "ops/norm_checks.h"
#include "ops/norm_launch.h"

namespace addnorm {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_norm_fwd(
    NormFwdKernel kernel, const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool store_residual,
    bool residual_in_fp32, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const auto plan = check_norm_fwd_inputs(
      input, residual, normalized_shape, weight, bias, eps, residual_in_fp32, dropout_p,
      dropout_seed);
  auto [out, residual_out, mean, rstd] =
      empty_norm_fwd_outputs(input, plan, is_rms, store_residual);
  NormFwdArgs args;
  args.N = c10::multiply_integers(input.sizes().slice(plan.axis));
  args.M = c10::multiply_integers(input.sizes().slice(0, plan.axis));
  if (args.M == 0) {
    return {out, residual_out, mean, rstd};
  }
  if (args.N == 0) {  // rows of nothing: statistics of an empty row, like torch
    if (!is_rms) mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {out, residual_out, mean, rstd};
  }
  args.x = input.contiguous();
  args.dtypes = plan.dtypes;
  if (residual.has_value()) {
    args.residual = residual->to(plan.dtypes.residual).contiguous();
  }
  if (weight.has_value()) {
    args.gamma = weight->to(plan.dtypes.param).contiguous();
  }
  if (bias.has_value() && !is_rms) {
    args.beta = bias->to(plan.dtypes.param).contiguous();
  }
  // The kernels write contiguous rows; an output in another memory format gets them copied.
  const at::Tensor out_rows =
      out.is_contiguous()
          ? out
          : at::empty(out.sizes(), out.options().memory_format(at::MemoryFormat::Contiguous));
  args.out = out_rows;
  if (store_residual) args.residual_out = residual_out;
  if (!is_rms) args.mean = mean;
  args.rstd = rstd;
  args.eps = eps;
  args.rms = is_rms;
  if (dropout_p > 0.0) {
    args.dropout_p = dropout_p;
    args.dropout_seed = dropout_seed->contiguous();
  }
  kernel(args);
  if (!out.is_same(out_rows)) {
    out.copy_(out_rows);
  }
  return {out, residual_out, mean, rstd};
}

namespace {
// (see WriteOver)
thread_local const c10::TensorImpl* over_h_impl = nullptr;
thread_local const c10::TensorImpl* over_grad_out_impl = nullptr;

const c10::TensorImpl* impl_or_null(const at::Tensor* t) {
  return t ? t->unsafeGetTensorImpl() : nullptr;
}
}  // namespace

WriteOver::WriteOver(const at::Tensor* h, const at::Tensor* grad_out)
    : prev_h_(over_h_impl), prev_grad_out_(over_grad_out_impl) {
  over_h_impl = impl_or_null(h);
  over_grad_out_impl = impl_or_null(grad_out);
}

WriteOver::~WriteOver() {
  over_h_impl = prev_h_;
  over_grad_out_impl = prev_grad_out_;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_norm_bwd(
    NormBwdKernel kernel, const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool is_rms, bool weight_grad, std::optional<double> eps, bool from_output,
    const std::optional<at::Tensor>& bias, std::optional<c10::ScalarType> h_dtype,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, bool grad_h_wanted,
    bool over_inputs) {
  const NormPlan plan = check_norm_bwd_inputs(
      grad_out, grad_residual_out, h, mean, rstd, weight, is_rms, eps, from_output, bias,
      h_dtype, dropout_p, dropout_seed, grad_h_wanted);
  const int64_t axis = plan.axis;
  const bool drop = dropout_p > 0.0;
  // Which outputs take an input's memory (see WriteOver): t, named by the scope, laid out as
  // the output (contiguous; h's shape, which the checks above ask of grad_out) in its dtype.
  auto can_take = [&](const at::Tensor& t, const c10::TensorImpl* named, c10::ScalarType dtype) {
    return over_inputs && named != nullptr && t.unsafeGetTensorImpl() == named &&
           t.is_contiguous() && t.scalar_type() == dtype;
  };
  const bool grad_h_over_h =
      grad_h_wanted && !from_output && can_take(h, over_h_impl, plan.dtypes.h);
  const bool grad_h_over_grad_out =
      grad_h_wanted && !grad_h_over_h && can_take(grad_out, over_grad_out_impl, plan.dtypes.h);
  const bool grad_input_over_grad_out =
      drop && !grad_h_over_grad_out && can_take(grad_out, over_grad_out_impl, plan.dtypes.x);
  // (once per scope: a second call in it, were there one, allocates)
  over_h_impl = over_grad_out_impl = nullptr;
  auto [grad_h, grad_weight, grad_bias, grad_input] = empty_norm_bwd_outputs(
      h, weight, has_bias, weight_grad, plan, drop && !grad_input_over_grad_out,
      grad_h_wanted && !grad_h_over_h && !grad_h_over_grad_out);
  // (tensors of their own, without autograd metadata, on the input's memory)
  auto take = [](at::Tensor& out, const at::Tensor& t) {
    out.set_(t.storage(), t.storage_offset(), t.sizes(), t.strides());
  };
  if (grad_h_over_h) take(grad_h, h);
  if (grad_h_over_grad_out) take(grad_h, grad_out);
  if (grad_input_over_grad_out) take(grad_input, grad_out);
  NormBwdArgs args;
  args.N = c10::multiply_integers(h.sizes().slice(axis));
  args.M = c10::multiply_integers(h.sizes().slice(0, axis));
  if (args.M == 0 || args.N == 0) {
    if (grad_weight.numel() > 0) grad_weight.zero_();
    if (has_bias) grad_bias.zero_();
    return {grad_h, grad_weight, grad_bias, grad_input};
  }
  args.dtypes = plan.dtypes;
  args.grad_out = grad_out.contiguous();
  if (grad_residual_out.has_value()) {
    args.grad_residual_out = grad_residual_out->contiguous();
  }
  args.h = h.contiguous();
  if (!is_rms && !from_output) args.mean = mean.contiguous();
  args.rstd = rstd.contiguous();
  if (weight.has_value()) {
    args.gamma = weight->to(plan.dtypes.param).contiguous();
    if (weight_grad) args.grad_gamma = grad_weight;
  }
  if (has_bias) args.grad_beta = grad_bias;
  if (grad_h_wanted) args.grad_h = grad_h;
  if (drop) {
    args.grad_input = grad_input;
    args.dropout_p = dropout_p;
    args.dropout_seed = dropout_seed->contiguous();
  }
  args.rms = is_rms;
  args.from_output = from_output;
  if (from_output) {
    if (bias.has_value() && !is_rms) {
      args.beta = bias->to(plan.dtypes.param).contiguous();
    }
  } else {
    args.eps = eps;
  }
  kernel(args);
  return {grad_h, grad_weight, grad_bias, grad_input};
}

at::Tensor launch_dropout_apply(
    DropoutApplyKernel kernel, const at::Tensor& input, const at::Tensor& seed, double p,
    std::optional<c10::ScalarType> dtype) {
  const auto plan = check_dropout_apply_inputs(input, seed, p, dtype);
  DropoutApplyArgs args;
  args.input = input.contiguous();
  args.seed = seed.contiguous();
  args.out = at::empty(input.sizes(), input.options().dtype(plan));
  args.p = p;
  if (input.numel() > 0) {
    kernel(args);
  }
  return args.out;
}

}  // namespace addnorm
