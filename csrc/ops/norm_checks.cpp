// Argument checks, the dtype policy and output allocation of the internal ops (declared in
// ops/norm_checks.h).

#include <cmath>
#include <limits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymIntArrayRef.h>

#include "ops/norm_checks.h"

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

c10::ScalarType stat_dtype_of(c10::ScalarType x) {
  return x == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype the kernels read weight and bias in: the input's for float32/float64 input
// (check_param refuses others there); for float16/bfloat16 input,
// the parameters' own dtype when both have the same one (the input's or float32), else
// float32.
c10::ScalarType param_dtype_of(
    c10::ScalarType x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias) {
  if (x == at::kFloat || x == at::kDouble) {
    return x;
  }
  const auto w = weight.has_value() ? weight->scalar_type() : x;
  const auto b = bias.has_value() ? bias->scalar_type() : w;
  const auto p = weight.has_value() ? w : b;
  return (w == b && (p == x || p == at::kFloat)) ? p : at::kFloat;
}

// A plain strided tensor: not nested, sparse, quantized or mkldnn (the dispatcher's message
// for those would name an internal op, or none).
void check_strided(const at::Tensor& t, const char* name) {
  // (a quantized tensor's layout is strided: it gets its own message, with what to do)
  TORCH_CHECK(!t.is_quantized(), "addnorm: ", name, " must be an unquantized tensor, got a "
              "quantized tensor (", t.scalar_type(), "): dequantize it first (the norms run in "
              "floating point)");
  TORCH_CHECK(t.layout() == at::kStrided && !t.is_nested(), "addnorm: ", name,
              " must be a strided tensor, got ",
              t.is_nested() ? "a nested tensor" : "a tensor of layout ",
              t.is_nested() ? "" : c10::str(t.layout()));
}

void check_same_device(const at::Tensor& t, const at::Tensor& input, const char* name) {
  // (an undefined tensor in an optional: only a C++ caller can pass one)
  TORCH_CHECK(t.defined(), "addnorm: ", name, " must be a tensor or None, got an undefined "
              "tensor");
  check_strided(t, name);
  TORCH_CHECK(
      t.device() == input.device(), "addnorm: ", name, " must be on the input's device ",
      input.device(), ", got device ", t.device());
}

void check_param(
    const at::Tensor& t, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const char* name) {
  check_same_device(t, input, name);
  TORCH_CHECK(
      same_shape(t.sym_sizes(), normalized_shape), "addnorm: ", name,
      " must have shape normalized_shape = ", normalized_shape, ", got ", t.sym_sizes());
  TORCH_CHECK(
      is_allowed_companion_dtype(t.scalar_type(), input.scalar_type()), "addnorm: ", name,
      " must have the input's dtype (", input.scalar_type(),
      "), a narrower float dtype, or for float16/bfloat16 input float16, bfloat16 or "
      "float32; got ", t.scalar_type());
}

}  // namespace

bool param_dtype_taken(c10::ScalarType param, c10::ScalarType input) {
  const auto read_as = (input == at::kHalf || input == at::kBFloat16) ? at::kFloat : input;
  return is_allowed_companion_dtype(param, input) ||
         (is_supported_float(param) && c10::elementSize(param) < c10::elementSize(read_as));
}

std::pair<std::optional<at::Tensor>, std::optional<at::Tensor>> widened_params(
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& input) {
  auto is_norm_dtype = [](c10::ScalarType t) {
    return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
  };
  if (!input.defined() || !is_norm_dtype(input.scalar_type())) return {weight, bias};
  const auto x = input.scalar_type();
  const auto read_as = (x == at::kHalf || x == at::kBFloat16) ? at::kFloat : x;
  auto narrower = [&](const std::optional<at::Tensor>& p) {  // than read_as
    return p.has_value() && p->defined() && is_norm_dtype(p->scalar_type()) &&
           c10::elementSize(p->scalar_type()) < c10::elementSize(read_as);
  };
  auto refused = [&](const std::optional<at::Tensor>& p) {
    return narrower(p) && !is_allowed_companion_dtype(p->scalar_type(), x);
  };
  if (!refused(weight) && !refused(bias)) return {weight, bias};
  auto widen = [&](const std::optional<at::Tensor>& p) {
    return narrower(p) ? std::optional<at::Tensor>(p->to(read_as)) : p;
  };
  return {widen(weight), widen(bias)};
}

void check_tensor_args(
    const at::Tensor& input,
    std::initializer_list<std::pair<const std::optional<at::Tensor>&, const char*>> others) {
  check_input_tensor(input);
  for (const auto& [t, name] : others) {
    if (t.has_value()) check_same_device(*t, input, name);
  }
}

void check_input_tensor(const at::Tensor& input) {
  TORCH_CHECK(input.defined(), "addnorm: input must be a tensor, got None");
  TORCH_CHECK(!input.is_nested(),
              "addnorm: input must be a strided tensor, got a nested tensor (the layer_norm and "
              "rms_norm functions and modules, in eager Python and in C++, hand nested input to "
              "torch's kernels; the ops, the add functions and scripted code take none: apply "
              "them to a jagged tensor's values() or to a padded tensor)");
  check_strided(input, "input");
}

void check_dropout_args(
    const at::Tensor& input, double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(  // (ValueError in Python, as torch's dropout)
      p >= 0.0 && p <= 1.0, "addnorm: dropout_p must be a probability in [0, 1], got ", p);
  // A seed given is checked whatever p is: one on another device would take the call to
  // that device's kernel (or the meta kernel), and a kernel reads it even at p = 0.
  if (!seed.has_value()) {
    TORCH_CHECK(
        p == 0.0, "addnorm: dropout_p = ", p,
        " needs dropout_seed, an int64 tensor of 2 elements on the input's device (the "
        "functional forms and modules draw it from torch's generator)");
    return;
  }
  check_same_device(*seed, input, "dropout_seed");
  TORCH_CHECK(
      seed->scalar_type() == at::kLong && seed->sym_numel() == 2,
      "addnorm: dropout_seed must be an int64 tensor of 2 elements, got ",
      seed->scalar_type(), " of shape ", seed->sym_sizes());
}

c10::ScalarType check_dropout_apply_inputs(
    const at::Tensor& input, const at::Tensor& seed, double p,
    std::optional<c10::ScalarType> dtype) {
  check_input_tensor(input);
  TORCH_CHECK(
      is_supported_float(input.scalar_type()),
      "addnorm: input must be a float32, float64, float16 or bfloat16 tensor, got ",
      input.scalar_type());
  const auto out = dtype.value_or(input.scalar_type());
  TORCH_CHECK(
      out == input.scalar_type() ||
          (input.scalar_type() == at::kFloat && (out == at::kHalf || out == at::kBFloat16)),
      "addnorm: dtype must be the input's (", input.scalar_type(),
      ") or, for float32 input, float16/bfloat16; got ", out);
  check_dropout_args(input, p, seed);
  return out;
}

void check_dropout_matmul_inputs(const at::Tensor& probs, const at::Tensor& value) {
  check_input_tensor(probs);
  TORCH_CHECK(value.defined(), "addnorm: value must be a tensor, got None");
  const int64_t d = probs.dim();
  const auto batch = [d](const at::Tensor& t) { return t.sym_sizes().slice(0, d - 2); };
  TORCH_CHECK(
      d >= 2 && value.dim() == d && same_shape(batch(probs), batch(value)) &&
          probs.sym_size(d - 1) == value.sym_size(d - 2),
      "addnorm: probs [..., L, S] and value [..., S, D] must have the same batch dims and S, "
      "got probs of shape ", probs.sym_sizes(), " and value of shape ", value.sym_sizes());
  TORCH_CHECK(
      probs.scalar_type() == value.scalar_type(), "addnorm: value must have probs' dtype (",
      probs.scalar_type(), "), got ", value.scalar_type());
  check_same_device(value, probs, "value");
}

NormPlan check_norm_fwd_inputs(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool residual_in_fp32, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  check_input_tensor(input);
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
      same_shape(input.sym_sizes().slice(axis), normalized_shape), "addnorm: normalized_shape ",
      normalized_shape, " must equal the trailing dims of the input, got input of shape ",
      input.sym_sizes());
  TORCH_CHECK(
      eps >= 0.0, "addnorm: eps must be a non-negative number, got ", eps);
  check_dropout_args(input, dropout_p, dropout_seed);
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
  if (residual.has_value()) {
    const auto& r = *residual;
    check_same_device(r, input, "residual");
    TORCH_CHECK(
        same_shape(r.sym_sizes(), input.sym_sizes()),
        "addnorm: residual must have the input's shape ", input.sym_sizes(), ", got ",
        r.sym_sizes());
    TORCH_CHECK(
        is_allowed_companion_dtype(r.scalar_type(), dtype),
        "addnorm: residual must have the input's dtype (", dtype,
        ") or, for float16/bfloat16 input, float32; got ", r.scalar_type());
  }
  // residual_in_fp32 (h float32) reads a float16/bfloat16 residual as it is.
  const auto residual_dtype = residual.has_value() ? residual->scalar_type() : dtype;
  return {axis, NormDtypes{dtype, residual_dtype,
                           h_dtype_of(dtype, residual_dtype, residual_in_fp32),
                           param_dtype_of(dtype, weight, bias), stat_dtype_of(dtype)}};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_norm_fwd_outputs(
    const at::Tensor& input, const NormPlan& plan, bool is_rms, bool store_residual) {
  const auto sizes = input.sym_sizes();
  const auto rows = sizes.slice(0, plan.axis);
  const auto stat_opts = input.options().dtype(plan.dtypes.stat);
  const c10::SymInt zero(0);
  const c10::SymIntArrayRef empty_shape(&zero, 1);
  const auto out_format = is_rms ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  auto out = at::empty_symint(sizes, input.options().memory_format(out_format));
  auto residual_out = at::empty_symint(
      store_residual ? sizes : empty_shape, input.options().dtype(plan.dtypes.h));
  auto mean = at::empty_symint(is_rms ? empty_shape : rows, stat_opts);
  auto rstd = at::empty_symint(rows, stat_opts);
  return {out, residual_out, mean, rstd};
}

NormPlan check_norm_bwd_inputs(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, bool is_rms, std::optional<double> eps,
    bool from_output, const std::optional<at::Tensor>& bias,
    std::optional<c10::ScalarType> h_dtype, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool grad_h_wanted) {
  check_dropout_args(h, dropout_p, dropout_seed);
  TORCH_CHECK(
      !eps.has_value() || *eps >= 0.0, "addnorm: eps must be a non-negative number, got ",
      eps.value_or(0.0));
  const char* h_name = from_output ? "the output (h with from_output)" : "h";
  TORCH_CHECK(
      is_supported_float(h.scalar_type()), "addnorm: ", h_name,
      " must be a float32, float64, float16 or bfloat16 tensor, got ", h.scalar_type());
  TORCH_CHECK(
      rstd.dim() < h.dim(), "addnorm: rstd must have fewer dims than ", h_name,
      ", got rstd of shape ", rstd.sym_sizes(), " and ", h_name, " of shape ", h.sym_sizes());
  const int64_t axis = rstd.dim();
  TORCH_CHECK(
      same_shape(rstd.sym_sizes(), h.sym_sizes().slice(0, axis)), "addnorm: rstd must have the "
      "leading shape of ", h_name, " ", h.sym_sizes().slice(0, axis), ", got ", rstd.sym_sizes());
  const auto stat_dtype = stat_dtype_of(h.scalar_type());
  TORCH_CHECK(
      rstd.scalar_type() == stat_dtype, "addnorm: rstd must be ", stat_dtype, ", got ",
      rstd.scalar_type());
  if (!is_rms && !from_output) {
    TORCH_CHECK(
        same_shape(mean.sym_sizes(), rstd.sym_sizes()) && mean.scalar_type() == stat_dtype,
        "addnorm: mean must match rstd (", stat_dtype, ", shape ", rstd.sym_sizes(), "), got ",
        mean.scalar_type(), " of shape ", mean.sym_sizes());
    check_same_device(mean, h, "mean");
  }
  check_same_device(rstd, h, "rstd");
  check_same_device(grad_out, h, "grad_out");
  TORCH_CHECK(
      same_shape(grad_out.sym_sizes(), h.sym_sizes()), "addnorm: grad_out must have the shape of ",
      h_name, " ", h.sym_sizes(), ", got ", grad_out.sym_sizes());
  const auto x = grad_out.scalar_type();
  c10::ScalarType grad_h_dtype = h.scalar_type();
  if (from_output) {
    TORCH_CHECK(
        x == h.scalar_type(), "addnorm: grad_out must have the output's dtype (",
        h.scalar_type(), "), got ", x);
    grad_h_dtype = h_dtype.value_or(x);
    TORCH_CHECK(
        is_allowed_companion_dtype(grad_h_dtype, x), "addnorm: h_dtype must be the output's "
        "dtype (", x, ") or, for a float16/bfloat16 output, float32; got ", grad_h_dtype);
  } else {
    TORCH_CHECK(
        x == h.scalar_type() || is_allowed_companion_dtype(h.scalar_type(), x),
        "addnorm: grad_out must have h's dtype (", h.scalar_type(),
        ") or, for float32 h, float16/bfloat16; got ", x);
    TORCH_CHECK(
        !h_dtype.has_value() || *h_dtype == grad_h_dtype, "addnorm: h_dtype (", *h_dtype,
        ") is for from_output; grad_h has h's dtype ", grad_h_dtype);
    TORCH_CHECK(!bias.has_value(), "addnorm: bias is read only with from_output=True");
  }
  if (grad_residual_out.has_value()) {
    check_same_device(*grad_residual_out, h, "grad_residual_out");
    TORCH_CHECK(
        same_shape(grad_residual_out->sym_sizes(), h.sym_sizes()) &&
            grad_residual_out->scalar_type() == grad_h_dtype,
        "addnorm: grad_residual_out must match h (", grad_h_dtype, ", shape ", h.sym_sizes(),
        "), got ", grad_residual_out->scalar_type(), " of shape ", grad_residual_out->sym_sizes());
  }
  const auto param_shape = h.sym_sizes().slice(axis);
  if (weight.has_value()) {
    check_same_device(*weight, h, "weight");
    TORCH_CHECK(
        same_shape(weight->sym_sizes(), param_shape), "addnorm: weight must have shape ",
        param_shape, ", got ", weight->sym_sizes());
    TORCH_CHECK(
        is_allowed_companion_dtype(weight->scalar_type(), x), "addnorm: weight must have "
        "grad_out's dtype (", x, ") or, for float16/bfloat16 grad_out, float32; got ",
        weight->scalar_type());
  }
  if (bias.has_value()) {
    check_same_device(*bias, h, "bias");
    TORCH_CHECK(
        same_shape(bias->sym_sizes(), param_shape), "addnorm: bias must have shape ", param_shape,
        ", got ", bias->sym_sizes());
    TORCH_CHECK(
        !weight.has_value() || weight->scalar_type() == bias->scalar_type(),
        "addnorm: bias must have the weight's dtype (", weight->scalar_type(), "), got ",
        bias->scalar_type());
  }
  return {axis, NormDtypes{x, grad_h_dtype, grad_h_dtype, param_dtype_of(x, weight, bias),
                           stat_dtype}};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_norm_bwd_outputs(
    const at::Tensor& h, const std::optional<at::Tensor>& weight, bool has_bias, bool weight_grad,
    const NormPlan& plan, bool dropout, bool grad_h_wanted) {
  const c10::SymInt zero(0);
  const c10::SymIntArrayRef empty_shape(&zero, 1);
  const auto param_shape = h.sym_sizes().slice(plan.axis);
  const auto param_opts =
      h.options().dtype(weight.has_value() ? weight->scalar_type() : plan.dtypes.stat);
  auto grad_h = at::empty_symint(grad_h_wanted ? h.sym_sizes() : empty_shape,
                                 h.options().dtype(plan.dtypes.h));
  auto grad_input =
      at::empty_symint(dropout ? h.sym_sizes() : empty_shape, h.options().dtype(plan.dtypes.x));
  auto grad_weight = at::empty_symint(
      weight.has_value() && weight_grad ? param_shape : empty_shape, param_opts);
  auto grad_bias = at::empty_symint(has_bias ? param_shape : empty_shape, param_opts);
  return {grad_h, grad_weight, grad_bias, grad_input};
}

double default_rms_eps(c10::ScalarType dtype) {
  return dtype == at::kDouble ? std::numeric_limits<double>::epsilon()
                              : static_cast<double>(std::numeric_limits<float>::epsilon());
}

bool same_shape(c10::SymIntArrayRef a, c10::SymIntArrayRef b) {
  return c10::sym_equals(a, b).expect_true(__FILE__, __LINE__);
}

}  // namespace addnorm
