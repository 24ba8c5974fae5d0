#pragma once

// CPU kernels, compiled once per instruction set (namespaces DEFAULT, AVX2 and AVX512, see
// CMakeLists.txt) and chosen at run time in cpu/norm_cpu.cpp.

#include <algorithm>
#include <cstdint>

#include <ATen/core/Tensor.h>

#include "ops/norm_args.h"

namespace addnorm::cpu {

// Rows per chunk of the backward. Each chunk sums the dgamma/dbeta contributions of its
// rows into its own partial row (rows in order), and the partial rows are added in chunk
// order. The split depends on M and N only, never on the thread count, so the weight
// gradients are bitwise the same however many threads run: at least 4 rows and 16384
// elements per chunk (the partial row costs as much as a few rows of data), at most 64
// chunks (the partials stay a small fraction of the data from a few thousand rows on; with
// few long rows, 64 chunks of 4 rows, 16 bytes per column each outgrow 16-bit data:
// docs/semantics.md, "Temporary memory").
inline int64_t bwd_chunk_rows(int64_t M, int64_t N) {
  constexpr int64_t kMinRows = 4;
  constexpr int64_t kMinElements = 16384;
  constexpr int64_t kMaxChunks = 64;
  const int64_t by_size = std::max(kMinRows, (kMinElements + N - 1) / std::max<int64_t>(N, 1));
  const int64_t by_count = (M + kMaxChunks - 1) / kMaxChunks;
  return std::max(by_size, by_count);
}

inline int64_t bwd_chunks(int64_t M, int64_t N) {
  const int64_t rows = bwd_chunk_rows(M, N);
  return (M + rows - 1) / rows;
}

#define ADDNORM_DECLARE_CPU_KERNELS(CAP)                                                  \
  namespace CAP {                                                                          \
  void norm_fwd_kernel(const NormFwdArgs& args);                                          \
  /* partials: [bwd_chunks(M, N), K, N] float64 per chunk of rows: K = 2 (dgamma,      */  \
  /* dbeta) for float32/float16/bfloat16 h, K = 4 (dgamma and dbeta as double-double  */  \
  /* hi, lo pairs) for float64 h; undefined when neither gradient is wanted.          */  \
  void norm_bwd_kernel(const NormBwdArgs& args, const at::Tensor& partials);              \
  /* The chunks' partials added in chunk order, into grad_gamma and grad_beta ([N],    */ \
  /* each in its own dtype; either may be undefined).                                  */ \
  void norm_bwd_reduce_kernel(const at::Tensor& partials, const at::Tensor& grad_gamma,  \
                              const at::Tensor& grad_beta);                              \
  /* _dropout_apply: input times the fused dropout's mask and scale, in out's dtype.   */ \
  void dropout_apply_kernel(const DropoutApplyArgs& args);                                \
  }

ADDNORM_DECLARE_CPU_KERNELS(DEFAULT)
ADDNORM_DECLARE_CPU_KERNELS(AVX2)
ADDNORM_DECLARE_CPU_KERNELS(AVX512)

#undef ADDNORM_DECLARE_CPU_KERNELS

}  // namespace addnorm::cpu
