#pragma once

// Argument checks, the dtype policy and output allocation of the internal ops, shared by
// every kernel that runs them: the device kernels (through ops/norm_launch.cpp) and the Meta
// kernels (ops/norm_meta.cpp), which run the same checks on symbolic shapes.

#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>

#include "ops/norm_args.h"

namespace addnorm {

// addnorm's ops take a strided tensor input; a None or nested input gets this error rather
// than the dispatcher's (or a nested kernel's).
void check_input_tensor(const at::Tensor& input);

// check_input_tensor, then each tensor given of the optional ones: defined, strided, on the
// input's device (what the public ops' kernels check before they call the internal ones,
// whose dispatch would fail first on a nested, sparse or quantized argument).
void check_tensor_args(
    const at::Tensor& input,
    std::initializer_list<std::pair<const std::optional<at::Tensor>&, const char*>> others);

// Equal shapes. A symbolic size with a value to guard on is compared as ==; an unbacked one
// (a data-dependent size under torch.compile) is assumed equal and asserted when the graph
// runs, as torch's own ops do, instead of failing the trace.
bool same_shape(c10::SymIntArrayRef a, c10::SymIntArrayRef b);

// Checks of _dropout_apply; the output dtype: dtype, or the input's (float32 input may
// round to float16/bfloat16, as h's gradient of float16/bfloat16 input does).
c10::ScalarType check_dropout_apply_inputs(
    const at::Tensor& input, const at::Tensor& seed, double p,
    std::optional<c10::ScalarType> dtype);

// Checks of _dropout_matmul's tensors (the seed and p are _dropout_apply's): probs
// [..., L, S] and value [..., S, D], at least 2-D, the same batch dims, dtype and device.
void check_dropout_matmul_inputs(const at::Tensor& probs, const at::Tensor& value);

// weight and bias, where either has a float dtype narrower than the one the kernels read
// parameters in (float16 or bfloat16 of float32/float64 input, float32 of float64 input,
// float16 of bfloat16 input and the reverse): both widened to that dtype (exactly: the
// wider dtype holds every value; both, as the kernels read one dtype), as torch's rms_norm
// promotes them; autograd returns their gradients in their own dtypes. Otherwise as they
// are (check_norm_fwd_inputs judges them).
std::pair<std::optional<at::Tensor>, std::optional<at::Tensor>> widened_params(
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& input);

// Whether the public norm ops take a weight or bias of dtype param beside input of dtype
// input: the input's, float32 beside float16/bfloat16 input, or a float dtype narrower than
// the one the kernels read parameters in (widened_params widens it).
bool param_dtype_taken(c10::ScalarType param, c10::ScalarType input);

// A call after its checks: the first normalized dim and the call's dtypes.
struct NormPlan {
  int64_t axis;       // input.dim() - len(normalized_shape)
  NormDtypes dtypes;  // see ops/norm_args.h
};

// h's dtype: float32 with residual_in_fp32 (float64 input stays float64), else the
// residual's, else the input's.
inline c10::ScalarType h_dtype_of(c10::ScalarType input, std::optional<c10::ScalarType> residual,
                                  bool residual_in_fp32) {
  return residual_in_fp32 && input != at::kDouble ? at::kFloat : residual.value_or(input);
}

// Checks of a forward call: input float32/float64/float16/bfloat16; normalized_shape its
// trailing dims; weight, bias and residual on the input's device with the documented shapes
// and dtypes; eps >= 0. Decides the call's dtypes: h has the residual's dtype, or float32
// with residual_in_fp32; weight and bias are read as the input's dtype or float32.
NormPlan check_norm_fwd_inputs(
    const at::Tensor& input,
    const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    bool residual_in_fp32,
    double dropout_p,
    const std::optional<at::Tensor>& dropout_seed);

// Checks of the fused dropout's arguments: 0 <= p <= 1; for p > 0 a seed, an int64 tensor
// of 2 elements on the input's device.
void check_dropout_args(
    const at::Tensor& input, double p, const std::optional<at::Tensor>& seed);

// (out, residual_out, mean, rstd): residual_out is [0] unless store_residual, mean is [0]
// for RMSNorm. All contiguous, except out of RMSNorm, which has the input's suggested memory
// format (channels_last stays channels_last), as F.rms_norm's result has; F.layer_norm's
// result is contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_norm_fwd_outputs(
    const at::Tensor& input,
    const NormPlan& plan,
    bool is_rms,
    bool store_residual);

// Checks of a backward call; the first normalized dim and the call's dtypes (x: grad_out's,
// h: h's (from_output: h_dtype, default y's), param: how weight and bias are read). With
// from_output, h is the forward's output y (grad_out's dtype) and mean is not read.
NormPlan check_norm_bwd_inputs(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& h,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    bool is_rms,
    std::optional<double> eps,
    bool from_output,
    const std::optional<at::Tensor>& bias,
    std::optional<c10::ScalarType> h_dtype,
    double dropout_p,
    const std::optional<at::Tensor>& dropout_seed,
    bool grad_h_wanted);

// (grad_h, grad_weight, grad_bias, grad_input): grad_h like h in plan.dtypes.h ([0] unless
// grad_h_wanted); grad_weight is [0] unless weight is given and weight_grad, grad_bias [0]
// without bias. They have the weight's dtype, or without a weight float32 (float64 for
// float64 h); the caller casts to the bias's dtype. grad_input: like h in plan.dtypes.x
// with dropout, else [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_norm_bwd_outputs(
    const at::Tensor& h,
    const std::optional<at::Tensor>& weight,
    bool has_bias,
    bool weight_grad,
    const NormPlan& plan,
    bool dropout,
    bool grad_h_wanted);

// eps=None of rms_norm: the machine epsilon of the type torch computes in
// (float32 for float16/bfloat16/float32, float64 for float64), as F.rms_norm does.
double default_rms_eps(c10::ScalarType dtype);

}  // namespace addnorm
