#pragma once

// The device kernels of the internal ops, for any backend: launch_norm_fwd/bwd run the
// checks, allocate the outputs, build the args structs (contiguous tensors of M rows of N,
// in the call's dtypes) and call the backend's kernel; each backend registers them for its
// dispatch key through ops/norm_register.h.

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>

#include "ops/norm_args.h"

namespace addnorm {

using NormFwdKernel = void (*)(const NormFwdArgs&);
using NormBwdKernel = void (*)(const NormBwdArgs&);

// _norm_fwd with the given kernel: (out, residual_out, mean, rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_norm_fwd(
    NormFwdKernel kernel, const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool store_residual,
    bool residual_in_fp32, double dropout_p, const std::optional<at::Tensor>& dropout_seed);

// _norm_bwd with the given kernel: (grad_h, grad_weight, grad_bias, grad_input).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_norm_bwd(
    NormBwdKernel kernel, const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool is_rms, bool weight_grad, std::optional<double> eps, bool from_output,
    const std::optional<at::Tensor>& bias, std::optional<c10::ScalarType> h_dtype,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, bool grad_h_wanted);

using DropoutApplyKernel = void (*)(const DropoutApplyArgs&);

// _dropout_apply with the given kernel.
at::Tensor launch_dropout_apply(
    DropoutApplyKernel kernel, const at::Tensor& input, const at::Tensor& seed, double p,
    std::optional<c10::ScalarType> dtype);

}  // namespace addnorm
