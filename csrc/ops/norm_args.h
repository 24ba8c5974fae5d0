#pragma once

// What one call of an internal op hands to a backend's kernel (cpu/, cuda/): the tensors,
// contiguous, holding the [M, N] rows and [N] parameters below (in the callers' shapes: the
// kernels read only their data, M and N), and every dtype of the call, decided once in
// ops/norm_checks.cpp (see docs/architecture.md, "Where dtypes are decided"). Tensors the
// call does not have are undefined (a null data pointer): the kernels take an absent weight
// as 1 and an absent bias as 0 without building either.

#include <optional>

#include <ATen/core/Tensor.h>

namespace addnorm {

// The dtypes of one call. The backends switch on these and check nothing else; the tensors
// in the args structs already have them.
struct NormDtypes {
  c10::ScalarType x;         // input and out (forward), grad_out (backward): T
  c10::ScalarType residual;  // residual (forward), grad_residual_out (backward): x's or h's
  c10::ScalarType h;         // h = input + residual, as rounded, stored and read back: H
  c10::ScalarType param;     // weight and bias as the kernels read them: W
  c10::ScalarType stat;      // mean, rstd and the compute type: float32 (float64 for float64 x)
};

// Forward: h = x (+ residual), rounded to dtypes.h; out = norm(h) * gamma + beta.
struct NormFwdArgs {
  at::Tensor x;             // [M, N] dtypes.x
  at::Tensor residual;      // [M, N] dtypes.residual; undefined when absent
  at::Tensor gamma;         // [N] dtypes.param; undefined when absent (1)
  at::Tensor beta;          // [N] dtypes.param; undefined when absent (0; always for RMS)
  at::Tensor out;           // [M, N] dtypes.x
  at::Tensor residual_out;  // [M, N] dtypes.h; undefined when h is not stored
  at::Tensor mean;          // [M] dtypes.stat; undefined for RMS
  at::Tensor rstd;          // [M] dtypes.stat
  NormDtypes dtypes;
  int64_t M = 0;
  int64_t N = 0;
  double eps = 0.0;
  bool rms = false;
  // Fused dropout of x (h = dropout(x) + residual) when dropout_p > 0: the int64 [2] seed
  // tensor on x's device (ops/dropout_mask.h); undefined without dropout.
  double dropout_p = 0.0;
  at::Tensor dropout_seed;
};

// input * keep-mask / (1 - p) (see ops/dropout_mask.h), rounded to out's dtype.
struct DropoutApplyArgs {
  at::Tensor input;  // contiguous
  at::Tensor seed;   // int64 [2] on input's device
  at::Tensor out;    // contiguous, input's shape
  double p = 0.0;
};

// Backward of out = norm(h) * gamma + beta with respect to h, gamma, beta.
// from_output: h holds the forward's output y instead, and the normalized values are
// xhat = (y - beta) / gamma (RMS: y / gamma); gamma has no zeros, mean and eps are unused.
struct NormBwdArgs {
  at::Tensor grad_out;           // [M, N] dtypes.x
  at::Tensor grad_residual_out;  // [M, N] dtypes.h; added into grad_h; undefined when absent
  at::Tensor h;                  // [M, N] dtypes.h (from_output: y, dtypes.x)
  at::Tensor mean;               // [M] dtypes.stat; undefined for RMS and from_output
  at::Tensor rstd;               // [M] dtypes.stat
  at::Tensor gamma;              // [N] dtypes.param; undefined when absent (1)
  at::Tensor beta;               // [N] dtypes.param; from_output only, undefined when absent
  bool from_output = false;
  at::Tensor grad_h;             // [M, N] dtypes.h (output); undefined when not wanted
  at::Tensor grad_gamma;         // [N] the weight's dtype (output); undefined when not wanted
  at::Tensor grad_beta;          // [N] the bias's dtype (output); undefined when not wanted
  NormDtypes dtypes;
  int64_t M = 0;
  int64_t N = 0;
  bool rms = false;
  // The forward's eps: the CPU kernels, and the CUDA kernels for float32 and float64 data and
  // for 16-bit data with a float32 h, then take the row statistics from h (in double);
  // absent, they use mean and rstd as given.
  std::optional<double> eps;
  // The forward's fused dropout (dropout_p > 0): grad_input = grad_h (rounded to
  // dtypes.h) times the keep-mask and scale of dropout_seed (int64 [2] on the device),
  // rounded to dtypes.x, as _dropout_apply would give it. Undefined without dropout.
  double dropout_p = 0.0;
  at::Tensor dropout_seed;
  at::Tensor grad_input;         // [M, N] dtypes.x (output)
};

}  // namespace addnorm
