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
// over_inputs: the kernel reads each element of h and of grad_out before it writes grad_h
// and grad_input at the same place, and never after, so these may take the memory of h or
// grad_out where a WriteOver scope allows it (the CPU kernels; not CUDA's, whose
// weight-gradient kernel reads h and grad_out after grad_h and the fused dropout's
// grad_input are written, and whose row kernels load both through the read-only cache).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_norm_bwd(
    NormBwdKernel kernel, const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_residual_out, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool is_rms, bool weight_grad, std::optional<double> eps, bool from_output,
    const std::optional<at::Tensor>& bias, std::optional<c10::ScalarType> h_dtype,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, bool grad_h_wanted,
    bool over_inputs = false);

// While in scope, on this thread, a launch_norm_bwd of these tensors h and grad_out (these
// TensorImpls; either may be null) with a kernel that allows it writes its outputs over
// them instead of allocating them: grad_h over h where the dtypes allow, else over
// grad_out, and the fused dropout's grad_input over grad_out where grad_h did not take it.
// The outputs are then tensors on those memories: fewer new [M, N] tensors, and the writes
// go where the backward has just read. The first launch in the scope consumes it. For the
// autograd node's backward only, for tensors that nothing else holds (norm_autograd.cpp).
class WriteOver {
 public:
  WriteOver(const at::Tensor* h, const at::Tensor* grad_out);
  ~WriteOver();
  WriteOver(const WriteOver&) = delete;
  WriteOver& operator=(const WriteOver&) = delete;

 private:
  const c10::TensorImpl* prev_h_;
  const c10::TensorImpl* prev_grad_out_;
};

using DropoutApplyKernel = void (*)(const DropoutApplyArgs&);

// _dropout_apply with the given kernel.
at::Tensor launch_dropout_apply(
    DropoutApplyKernel kernel, const at::Tensor& input, const at::Tensor& seed, double p,
    std::optional<c10::ScalarType> dtype);

}  // namespace addnorm
