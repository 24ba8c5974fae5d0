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
// h_reusable: the kernel reads each element of h before it writes grad_h at the same place
// and never after, so grad_h may take h's memory where a ReuseH scope allows it (the CPU
// kernels; not CUDA's, whose weight-gradient kernel reads h after grad_h is written).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_norm_bwd(
    NormBwdKernel kernel, const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool is_rms, bool weight_grad, std::optional<double> eps, bool from_output,
    const std::optional<at::Tensor>& bias, std::optional<c10::ScalarType> h_dtype,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, bool grad_h_wanted,
    bool h_reusable = false);

// While in scope, on this thread, a launch_norm_bwd of the tensor h (this TensorImpl) with
// a kernel that allows it writes grad_h over h (the kernel reads from h, writes there, and
// returns a tensor on h's memory) instead of allocating it: no new [M, N] tensor, and the
// writes go where the backward has just read. For the autograd node's backward only, for an
// h that nothing else holds and whose graph is freed after it (norm_autograd.cpp).
class ReuseH {
 public:
  explicit ReuseH(const at::Tensor& h);
  ~ReuseH();
  ReuseH(const ReuseH&) = delete;
  ReuseH& operator=(const ReuseH&) = delete;

 private:
  const c10::TensorImpl* prev_;
};

using DropoutApplyKernel = void (*)(const DropoutApplyArgs&);

// _dropout_apply with the given kernel.
at::Tensor launch_dropout_apply(
    DropoutApplyKernel kernel, const at::Tensor& input, const at::Tensor& seed, double p,
    std::optional<c10::ScalarType> dtype);

}  // namespace addnorm
