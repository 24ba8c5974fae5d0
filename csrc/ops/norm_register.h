#pragma once

// Registration of a backend's kernels of the internal ops (inside
// TORCH_LIBRARY_IMPL(addnorm, <key>, m) in cpu/norm_cpu.cpp and cuda/norm_kernels.cu): the
// dispatcher then picks the backend from the tensors' device, and a build without the CUDA
// sources has no CUDA kernel.

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <torch/library.h>

#include "ops/norm_launch.h"

namespace addnorm {

// Registers _norm_fwd, _norm_bwd and _dropout_apply for the library's dispatch key (inside
// TORCH_LIBRARY_IMPL(addnorm, <key>, m)) with the kernels kFwd, kBwd and kDropout;
// kBwdOverInputs: kBwd may write its outputs over h and grad_out (launch_norm_bwd's
// over_inputs).
template <NormFwdKernel kFwd, NormBwdKernel kBwd, DropoutApplyKernel kDropout,
          bool kBwdOverInputs = false>
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
            bool weight_grad, std::optional<double> eps, bool from_output,
            const std::optional<at::Tensor>& bias, std::optional<c10::ScalarType> h_dtype,
            double dropout_p, const std::optional<at::Tensor>& dropout_seed,
            bool grad_h_wanted) {
           return launch_norm_bwd(kBwd, grad_out, grad_residual_out, h, mean, rstd, weight,
                                  has_bias, is_rms, weight_grad, eps, from_output, bias,
                                  h_dtype, dropout_p, dropout_seed, grad_h_wanted,
                                  kBwdOverInputs);
         });
}

}  // namespace addnorm
