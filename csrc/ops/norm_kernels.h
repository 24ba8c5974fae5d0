#pragma once

// The boundary between the device-independent host code (checks, allocation) in
// ops/norm.cpp and the per-device kernels (cpu/, cuda/). All tensors are contiguous.

#include <optional>

#include <ATen/core/Tensor.h>

namespace addnorm {

// Forward: h = x (+ residual), rounded to residual_out's dtype; out = norm(h) * gamma + beta.
struct NormFwdArgs {
  at::Tensor x;             // [M, N] input dtype T
  at::Tensor residual;      // [M, N] T or float32; undefined when absent
  at::Tensor gamma;         // [N] T or float32; undefined when absent
  at::Tensor beta;          // [N] same dtype as gamma; undefined when absent (always for RMS)
  at::Tensor out;           // [M, N] T
  at::Tensor residual_out;  // [M, N] h dtype H (T or float32); undefined when not stored
  at::Tensor mean;          // [M] float32 (float64 for T = float64); undefined for RMS
  at::Tensor rstd;          // [M] same dtype as mean
  c10::ScalarType h_dtype;  // dtype h is rounded to (residual_out's dtype when stored)
  int64_t M = 0;
  int64_t N = 0;
  double eps = 0.0;
  bool rms = false;
};

// Backward of out = norm(h) * gamma + beta with respect to h, gamma, beta.
struct NormBwdArgs {
  at::Tensor grad_out;           // [M, N] dtype of out (G)
  at::Tensor grad_residual_out;  // [M, N] dtype of h; added into grad_h; undefined when absent
  at::Tensor h;                  // [M, N] the normalized input, dtype H
  at::Tensor mean;               // [M] float32/float64; undefined for RMS
  at::Tensor rstd;               // [M]
  at::Tensor gamma;              // [N] weight dtype; undefined when absent
  at::Tensor grad_h;             // [M, N] H (output)
  at::Tensor grad_gamma;         // [N] weight dtype (output); undefined when not wanted
  at::Tensor grad_beta;          // [N] bias dtype (output); undefined when not wanted
  int64_t M = 0;
  int64_t N = 0;
  bool rms = false;
  // The forward's eps: the CPU kernels then take the row statistics from h (in double);
  // absent, they use mean and rstd as given.
  std::optional<double> eps;
};

namespace cpu {
void norm_fwd(const NormFwdArgs& args);
void norm_bwd(const NormBwdArgs& args);
const char* capability();
}  // namespace cpu

namespace cuda {
void norm_fwd(const NormFwdArgs& args);
void norm_bwd(const NormBwdArgs& args);
bool available();  // built with CUDA kernels
}  // namespace cuda

}  // namespace addnorm
