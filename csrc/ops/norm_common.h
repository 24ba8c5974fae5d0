#pragma once

// Argument checks and output allocation shared by the device kernels (ops/norm.cpp),
// the Meta kernels (ops/norm_meta.cpp) and the C++ entry points. SymInt-aware, so the
// same checks run under torch.compile with dynamic shapes.

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymIntArrayRef.h>

namespace addnorm {

// The public ops' first check: an input (None from Python is an undefined tensor, which
// the dispatcher could not route).
void check_input_defined(const at::Tensor& input);

// What the checks of a forward call decide.
struct NormFwdPlan {
  int64_t axis;                // first normalized dim; rows are input.sizes()[:axis]
  c10::ScalarType h_dtype;     // dtype of h = input + residual
  c10::ScalarType stat_dtype;  // dtype of mean and rstd
};

NormFwdPlan check_norm_fwd_inputs(
    const at::Tensor& input,
    const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    bool residual_in_fp32);

// (out, residual_out, mean, rstd); residual_out is [0] unless store_residual, mean is [0]
// for RMSNorm. All contiguous, except out of RMSNorm, which has the input's suggested memory
// format (channels_last stays channels_last), as F.rms_norm's result has; F.layer_norm's
// result is contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_norm_fwd_outputs(
    const at::Tensor& input,
    const NormFwdPlan& plan,
    bool is_rms,
    bool store_residual);

// Checks of a backward call; returns the first normalized dim.
int64_t check_norm_bwd_inputs(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& h,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    bool is_rms,
    std::optional<double> eps);

// (grad_h, grad_weight, grad_bias): grad_weight is [0] unless weight is given and
// weight_grad, grad_bias [0] without bias. They have the weight's dtype, or without a
// weight float32 (float64 for float64 h); the caller casts to the bias's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_norm_bwd_outputs(
    const at::Tensor& h,
    const std::optional<at::Tensor>& weight,
    bool has_bias,
    bool weight_grad,
    int64_t axis);

// eps=None of rms_norm: the machine epsilon of the type torch computes in
// (float32 for float16/bfloat16/float32, float64 for float64), as F.rms_norm does.
double default_rms_eps(c10::ScalarType dtype);

// Typed handles of the internal ops, for calls through the dispatcher.
using NormFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool, bool, bool);
using NormBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, bool, bool, bool,
    std::optional<double>);

c10::TypedOperatorHandle<NormFwdSig> norm_fwd_op();
c10::TypedOperatorHandle<NormBwdSig> norm_bwd_op();

}  // namespace addnorm
