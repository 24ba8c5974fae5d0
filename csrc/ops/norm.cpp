// Host side of the norm ops: argument checks, output allocation, the device kernels'
// entry (CPU and CUDA share it), the public ops below autograd, and the C++ API.

#include <cmath>
#include <limits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <addnorm/ops.h>

#include "ops/norm_common.h"
#include "ops/norm_kernels.h"

namespace addnorm {
namespace {

bool is_supported_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// weight/bias/residual have the input's dtype or, for mixed precision with float16 or
// bfloat16 input, float32.
bool is_allowed_companion_dtype(c10::ScalarType t, c10::ScalarType input) {
  return t == input || (t == at::kFloat && (input == at::kHalf || input == at::kBFloat16));
}

void check_same_device(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(
      t.device() == input.device(), "addnorm: ", name, " must be on the input's device ",
      input.device(), ", got device ", t.device());
}

void check_param(
    const at::Tensor& t, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const char* name) {
  check_same_device(t, input, name);
  TORCH_CHECK(
      t.sym_sizes().equals(normalized_shape), "addnorm: ", name,
      " must have shape normalized_shape = ", normalized_shape, ", got ", t.sym_sizes());
  TORCH_CHECK(
      is_allowed_companion_dtype(t.scalar_type(), input.scalar_type()), "addnorm: ", name,
      " must have the input's dtype (", input.scalar_type(),
      ") or, for float16/bfloat16 input, float32; got ", t.scalar_type());
}

}  // namespace

void check_input_defined(const at::Tensor& input) {
  TORCH_CHECK(input.defined(), "addnorm: input must be a tensor, got None");
}

NormFwdPlan check_norm_fwd_inputs(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool residual_in_fp32) {
  check_input_defined(input);
  const auto dtype = input.scalar_type();
  TORCH_CHECK(
      is_supported_float(dtype),
      "addnorm: input must be a float32, float64, float16 or bfloat16 tensor, got ", dtype);
  const int64_t ndim = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(
      ndim >= 1, "addnorm: normalized_shape must have at least one dimension, got ",
      normalized_shape);
  TORCH_CHECK(
      input.dim() >= ndim, "addnorm: normalized_shape ", normalized_shape,
      " has more dimensions than the input of shape ", input.sym_sizes());
  const int64_t axis = input.dim() - ndim;
  TORCH_CHECK(
      input.sym_sizes().slice(axis).equals(normalized_shape), "addnorm: normalized_shape ",
      normalized_shape, " must equal the trailing dims of the input, got input of shape ",
      input.sym_sizes());
  TORCH_CHECK(
      eps >= 0.0, "addnorm: eps must be a non-negative number, got ", eps);
  if (weight.has_value()) {
    check_param(*weight, input, normalized_shape, "weight");
  }
  if (bias.has_value()) {
    check_param(*bias, input, normalized_shape, "bias");
    TORCH_CHECK(
        !weight.has_value() || weight->scalar_type() == bias->scalar_type(),
        "addnorm: bias must have the weight's dtype (", weight->scalar_type(), "), got ",
        bias->scalar_type());
  }
  c10::ScalarType h_dtype = dtype;
  if (residual.has_value()) {
    const auto& r = *residual;
    check_same_device(r, input, "residual");
    TORCH_CHECK(
        r.sym_sizes().equals(input.sym_sizes()), "addnorm: residual must have the input's shape ",
        input.sym_sizes(), ", got ", r.sym_sizes());
    TORCH_CHECK(
        is_allowed_companion_dtype(r.scalar_type(), dtype),
        "addnorm: residual must have the input's dtype (", dtype,
        ") or, for float16/bfloat16 input, float32; got ", r.scalar_type());
    h_dtype = r.scalar_type();
  }
  if (residual_in_fp32 && dtype != at::kDouble) {
    h_dtype = at::kFloat;
  }
  return {axis, h_dtype, dtype == at::kDouble ? at::kDouble : at::kFloat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_norm_fwd_outputs(
    const at::Tensor& input, const NormFwdPlan& plan, bool is_rms, bool store_residual) {
  const auto sizes = input.sym_sizes();
  const auto rows = sizes.slice(0, plan.axis);
  const auto stat_opts = input.options().dtype(plan.stat_dtype);
  const c10::SymInt zero(0);
  const c10::SymIntArrayRef empty_shape(&zero, 1);
  const auto out_format = is_rms ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  auto out = at::empty_symint(sizes, input.options().memory_format(out_format));
  auto residual_out = at::empty_symint(
      store_residual ? sizes : empty_shape, input.options().dtype(plan.h_dtype));
  auto mean = at::empty_symint(is_rms ? empty_shape : rows, stat_opts);
  auto rstd = at::empty_symint(rows, stat_opts);
  return {out, residual_out, mean, rstd};
}

int64_t check_norm_bwd_inputs(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, bool is_rms, std::optional<double> eps) {
  TORCH_CHECK(
      !eps.has_value() || *eps >= 0.0, "addnorm: eps must be a non-negative number, got ",
      eps.value_or(0.0));
  TORCH_CHECK(
      is_supported_float(h.scalar_type()),
      "addnorm: h must be a float32, float64, float16 or bfloat16 tensor, got ", h.scalar_type());
  TORCH_CHECK(
      rstd.dim() < h.dim(), "addnorm: rstd must have fewer dims than h, got rstd of shape ",
      rstd.sym_sizes(), " and h of shape ", h.sym_sizes());
  const int64_t axis = rstd.dim();
  TORCH_CHECK(
      rstd.sym_sizes().equals(h.sym_sizes().slice(0, axis)),
      "addnorm: rstd must have the leading shape of h ", h.sym_sizes().slice(0, axis), ", got ",
      rstd.sym_sizes());
  const auto stat_dtype = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(
      rstd.scalar_type() == stat_dtype, "addnorm: rstd must be ", stat_dtype, ", got ",
      rstd.scalar_type());
  if (!is_rms) {
    TORCH_CHECK(
        mean.sym_sizes().equals(rstd.sym_sizes()) && mean.scalar_type() == stat_dtype,
        "addnorm: mean must match rstd (", stat_dtype, ", shape ", rstd.sym_sizes(), "), got ",
        mean.scalar_type(), " of shape ", mean.sym_sizes());
    check_same_device(mean, h, "mean");
  }
  check_same_device(rstd, h, "rstd");
  check_same_device(grad_out, h, "grad_out");
  TORCH_CHECK(
      grad_out.sym_sizes().equals(h.sym_sizes()), "addnorm: grad_out must have h's shape ",
      h.sym_sizes(), ", got ", grad_out.sym_sizes());
  TORCH_CHECK(
      grad_out.scalar_type() == h.scalar_type() ||
          is_allowed_companion_dtype(h.scalar_type(), grad_out.scalar_type()),
      "addnorm: grad_out must have h's dtype (", h.scalar_type(),
      ") or, for float32 h, float16/bfloat16; got ", grad_out.scalar_type());
  if (grad_residual_out.has_value()) {
    check_same_device(*grad_residual_out, h, "grad_residual_out");
    TORCH_CHECK(
        grad_residual_out->sym_sizes().equals(h.sym_sizes()) &&
            grad_residual_out->scalar_type() == h.scalar_type(),
        "addnorm: grad_residual_out must match h (", h.scalar_type(), ", shape ", h.sym_sizes(),
        "), got ", grad_residual_out->scalar_type(), " of shape ", grad_residual_out->sym_sizes());
  }
  if (weight.has_value()) {
    check_same_device(*weight, h, "weight");
    TORCH_CHECK(
        weight->sym_sizes().equals(h.sym_sizes().slice(axis)),
        "addnorm: weight must have shape ", h.sym_sizes().slice(axis), ", got ",
        weight->sym_sizes());
  }
  return axis;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_norm_bwd_outputs(
    const at::Tensor& h, const std::optional<at::Tensor>& weight, bool has_bias, bool weight_grad,
    int64_t axis) {
  const c10::SymInt zero(0);
  const c10::SymIntArrayRef empty_shape(&zero, 1);
  const auto param_shape = h.sym_sizes().slice(axis);
  const auto stat_dtype = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto param_opts =
      h.options().dtype(weight.has_value() ? weight->scalar_type() : stat_dtype);
  auto grad_h = at::empty_symint(h.sym_sizes(), h.options());
  auto grad_weight = at::empty_symint(
      weight.has_value() && weight_grad ? param_shape : empty_shape, param_opts);
  auto grad_bias = at::empty_symint(has_bias ? param_shape : empty_shape, param_opts);
  return {grad_h, grad_weight, grad_bias};
}

double default_rms_eps(c10::ScalarType dtype) {
  return dtype == at::kDouble ? std::numeric_limits<double>::epsilon()
                              : static_cast<double>(std::numeric_limits<float>::epsilon());
}

c10::TypedOperatorHandle<NormFwdSig> norm_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("addnorm::_norm_fwd", "").typed<NormFwdSig>();
  return op;
}

c10::TypedOperatorHandle<NormBwdSig> norm_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("addnorm::_norm_bwd", "").typed<NormBwdSig>();
  return op;
}

namespace {

// _norm_fwd on a real device: checks, allocation, then the device's kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_device(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool store_residual,
    bool residual_in_fp32) {
  const auto plan = check_norm_fwd_inputs(
      input, residual, normalized_shape, weight, bias, eps, residual_in_fp32);
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
  const std::vector<int64_t> shape2d{args.M, args.N};
  args.x = input.contiguous().view(shape2d);
  if (residual.has_value()) args.residual = residual->contiguous().view(shape2d);
  if (weight.has_value()) args.gamma = weight->contiguous().view({args.N});
  if (bias.has_value() && !is_rms) args.beta = bias->contiguous().view({args.N});
  // The kernels write contiguous rows; an output in another memory format gets them copied.
  const at::Tensor out_rows = out.is_contiguous() ? out : at::empty(out.sizes(), out.options().memory_format(at::MemoryFormat::Contiguous));
  args.out = out_rows.view(shape2d);
  if (store_residual) args.residual_out = residual_out.view(shape2d);
  if (!is_rms) args.mean = mean.view({args.M});
  args.rstd = rstd.view({args.M});
  args.h_dtype = plan.h_dtype;
  args.eps = eps;
  args.rms = is_rms;
  if (input.is_cuda()) {
    cuda::norm_fwd(args);
  } else {
    cpu::norm_fwd(args);
  }
  if (!out.is_same(out_rows)) {
    out.copy_(out_rows);
  }
  return {out, residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_device(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, bool has_bias, bool is_rms, bool weight_grad,
    std::optional<double> eps) {
  const int64_t axis =
      check_norm_bwd_inputs(grad_out, grad_residual_out, h, mean, rstd, weight, is_rms, eps);
  auto [grad_h, grad_weight, grad_bias] =
      empty_norm_bwd_outputs(h, weight, has_bias, weight_grad, axis);
  NormBwdArgs args;
  args.N = c10::multiply_integers(h.sizes().slice(axis));
  args.M = c10::multiply_integers(h.sizes().slice(0, axis));
  if (args.M == 0 || args.N == 0) {
    if (grad_weight.numel() > 0) grad_weight.zero_();
    if (has_bias) grad_bias.zero_();
    return {grad_h, grad_weight, grad_bias};
  }
  const std::vector<int64_t> shape2d{args.M, args.N};
  args.grad_out = grad_out.contiguous().view(shape2d);
  if (grad_residual_out.has_value()) {
    args.grad_residual_out = grad_residual_out->contiguous().view(shape2d);
  }
  args.h = h.contiguous().view(shape2d);
  if (!is_rms) args.mean = mean.contiguous().view({args.M});
  args.rstd = rstd.contiguous().view({args.M});
  if (weight.has_value()) {
    args.gamma = weight->contiguous().view({args.N});
    if (weight_grad) args.grad_gamma = grad_weight.view({args.N});
  }
  if (has_bias) args.grad_beta = grad_bias.view({args.N});
  args.grad_h = grad_h.view(shape2d);
  args.rms = is_rms;
  args.eps = eps;
  if (h.is_cuda()) {
    cuda::norm_bwd(args);
  } else {
    cpu::norm_bwd(args);
  }
  return {grad_h, grad_weight, grad_bias};
}

// The public ops below autograd (CompositeExplicitAutograd: every backend and Meta).
// Autograd for them lives in ops/norm_autograd.cpp.
at::Tensor layer_norm_composite(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  check_input_defined(input);
  return std::get<0>(norm_fwd_op().call(
      input, std::nullopt, normalized_shape, weight, bias, eps, false, false, false));
}

at::Tensor rms_norm_composite(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, std::optional<double> eps) {
  check_input_defined(input);
  return std::get<0>(norm_fwd_op().call(
      input, std::nullopt, normalized_shape, weight, std::nullopt,
      eps.value_or(default_rms_eps(input.scalar_type())), true, false, false));
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_composite(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool return_residual,
    bool residual_in_fp32) {
  check_input_defined(input);
  auto outs = norm_fwd_op().call(
      input, residual, normalized_shape, weight, bias, eps, false, return_residual,
      residual_in_fp32);
  return {std::get<0>(outs), std::get<1>(outs)};
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_composite(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    std::optional<double> eps, bool return_residual, bool residual_in_fp32) {
  check_input_defined(input);
  auto outs = norm_fwd_op().call(
      input, residual, normalized_shape, weight, std::nullopt,
      eps.value_or(default_rms_eps(input.scalar_type())), true, return_residual,
      residual_in_fp32);
  return {std::get<0>(outs), std::get<1>(outs)};
}

}  // namespace

TORCH_LIBRARY_IMPL(addnorm, CPU, m) {
  m.impl("_norm_fwd", &norm_fwd_device);
  m.impl("_norm_bwd", &norm_bwd_device);
}

TORCH_LIBRARY_IMPL(addnorm, CUDA, m) {
  m.impl("_norm_fwd", &norm_fwd_device);
  m.impl("_norm_bwd", &norm_bwd_device);
}

TORCH_LIBRARY_IMPL(addnorm, CompositeExplicitAutograd, m) {
  m.impl("layer_norm", &layer_norm_composite);
  m.impl("rms_norm", &rms_norm_composite);
  m.impl("add_layer_norm", &add_layer_norm_composite);
  m.impl("add_rms_norm", &add_rms_norm_composite);
}

// ---------------------------------------------------------------------------------------
// C++ API: through the dispatcher, so callers get autograd and every backend.

namespace {
template <typename Sig>
c10::TypedOperatorHandle<Sig> public_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
}  // namespace

at::Tensor layer_norm(
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  static const auto op = public_op<at::Tensor(
      const at::Tensor&, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, double)>("addnorm::layer_norm");
  return op.call(input, c10::fromIntArrayRefSlow(normalized_shape), weight, bias, eps);
}

at::Tensor rms_norm(
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, std::optional<double> eps) {
  static const auto op = public_op<at::Tensor(
      const at::Tensor&, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
      std::optional<double>)>("addnorm::rms_norm");
  return op.call(input, c10::fromIntArrayRefSlow(normalized_shape), weight, eps);
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool return_residual,
    bool residual_in_fp32) {
  static const auto op = public_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool, bool)>(
      "addnorm::add_layer_norm");
  return op.call(
      input, residual, c10::fromIntArrayRefSlow(normalized_shape), weight, bias, eps,
      return_residual, residual_in_fp32);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    std::optional<double> eps, bool return_residual, bool residual_in_fp32) {
  static const auto op = public_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
      const std::optional<at::Tensor>&, std::optional<double>, bool, bool)>("addnorm::add_rms_norm");
  return op.call(
      input, residual, c10::fromIntArrayRefSlow(normalized_shape), weight, eps, return_residual,
      residual_in_fp32);
}

const char* version() { return ADDNORM_VERSION_STRING; }

const char* cpu_kernel_capability() { return cpu::capability(); }

bool built_with_cuda() { return cuda::available(); }

namespace detail {
int ensure_ops_registered() { return 1; }
}  // namespace detail

}  // namespace addnorm
