#pragma once

// CPU kernels, compiled once per instruction set (namespaces DEFAULT and AVX2, see
// CMakeLists.txt) and chosen at run time in cpu/norm_dispatch.cpp.

#include <ATen/core/Tensor.h>

#include "ops/norm_kernels.h"

namespace addnorm::cpu {

#define ADDNORM_DECLARE_CPU_KERNELS(CAP)                                                  \
  namespace CAP {                                                                          \
  /* gamma, beta: [N] in the compute type (float32; float64 for float64 input). */        \
  void norm_fwd_kernel(const NormFwdArgs& args, const at::Tensor& gamma,                  \
                       const at::Tensor& beta);                                            \
  /* partials: [chunks, 2, N] compute type (dgamma, dbeta per chunk of rows), or      */  \
  /* undefined when neither gradient is wanted.                                      */  \
  void norm_bwd_kernel(const NormBwdArgs& args, const at::Tensor& gamma,                  \
                       const at::Tensor& partials);                                        \
  }

ADDNORM_DECLARE_CPU_KERNELS(DEFAULT)
ADDNORM_DECLARE_CPU_KERNELS(AVX2)

#undef ADDNORM_DECLARE_CPU_KERNELS

}  // namespace addnorm::cpu
