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
    bool residual_in_fp32);

// _norm_bwd with the given kernel: (grad_h, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> launch_norm_bwd(
    NormBwdKernel kernel, const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool is_rms, bool weight_grad, std::optional<double> eps);

// Registers _norm_fwd and _norm_bwd for the library's dispatch key (inside
// TORCH_LIBRARY_IMPL(addnorm, <key>, m)) with the kernels kFwd and kBwd.
template <NormFwdKernel kFwd, NormBwdKernel kBwd>
void register_norm_kernels(torch::Library& m) {
  m.impl("_norm_fwd",
         [](const at::Tensor& input, const std::optional<at::Tensor>& residual,
            c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
            const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool store_residual,
            bool residual_in_fp32) {
           return launch_norm_fwd(kFwd, input, residual, normalized_shape, weight, bias, eps,
                                  is_rms, store_residual, residual_in_fp32);
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
