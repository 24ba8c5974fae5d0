#pragma once

// The device kernels of the internal ops, for any backend: each backend registers its
// kernels for its dispatch key with register_norm_kernels<fwd, bwd>(m) (cpu/norm_cpu.cpp,
// cuda/norm_kernels.cu), so the dispatcher picks the backend from the tensors' device and a
// build without CUDA sources has no CUDA kernel. launch_norm_fwd/bwd run the checks, allocate
// the outputs, build the args structs (2-D contiguous views, tensors in the call's dtypes)
// and call the backend's kernel.

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <torch/library.h>

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

// _norm_bwd with the given kernel: (grad_h, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> launch_norm_bwd(
    NormBwdKernel kernel, const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool is_rms, bool weight_grad, std::optional<double> eps);

using DropoutApplyKernel = void (*)(const DropoutApplyArgs&);

// _dropout_apply with the given kernel.
at::Tensor launch_dropout_apply(
    DropoutApplyKernel kernel, const at::Tensor& input, const at::Tensor& seed, double p,
    std::optional<c10::ScalarType> dtype);

// Registers _norm_fwd, _norm_bwd and _dropout_apply for the library's dispatch key (inside
// TORCH_LIBRARY_IMPL(addnorm, <key>, m)) with the kernels kFwd, kBwd and kDropout.
template <NormFwdKernel kFwd, NormBwdKernel kBwd, DropoutApplyKernel kDropout>
void register_norm_kernels(torch::Library& m) {
  m.impl("_dropout_apply",
         [](const at::Tensor& input, const at::Tensor& seed, double p,
            std::optional<c10::ScalarType> dtype) {
           return launch_dropout_apply(kDropout, input, seed, p, dtype);
         });
  m.impl("_norm_fwd",
         [](const at::Tensor& input, const std::optional<at::Tensor>& residual,
            c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
            const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool store_residual,
            bool residual_in_fp32, double dropout_p,
            const std::optional<at::Tensor>& dropout_seed) {
           return launch_norm_fwd(kFwd, input, residual, normalized_shape, weight, bias, eps,
                                  is_rms, store_residual, residual_in_fp32, dropout_p,
                                  dropout_seed);
         });
  m.impl("_norm_bwd",
         [](const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
            const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd,
            const std::optional<at::Tensor>& weight, bool has_bias, bool is_rms,
            bool weight_grad, std::optional<double> eps) {
           return launch_norm_bwd(kBwd, grad_out, grad_residual_out, h, mean, rstd, weight,
                                  has_bias, is_rms, weight_grad, eps);
         });
}

}  // namespace addnorm
