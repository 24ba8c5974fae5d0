// Picks the CPU kernels for this processor (ATen's choice, so ATEN_CPU_CAPABILITY=default
// selects the portable build) and prepares what they share: gamma/beta in the compute
// type, and the per-chunk dgamma/dbeta partials with their fixed-order reduction.

#include <algorithm>
#include <string>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include "cpu/norm_kernel.h"

namespace addnorm::cpu {
namespace {

bool use_avx2() {
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return avx2;
}

c10::ScalarType compute_dtype(c10::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

const char* capability() { return use_avx2() ? "AVX2" : "DEFAULT"; }

void norm_fwd(const NormFwdArgs& args) {
  const auto opts = args.x.options().dtype(compute_dtype(args.x.scalar_type()));
  // Absent weight/bias become 1/0 vectors: N elements, so the kernels need one path.
  const at::Tensor gamma = args.gamma.defined() ? args.gamma.to(opts.dtype()).contiguous()
                                                : at::ones({args.N}, opts);
  const at::Tensor beta = args.beta.defined() ? args.beta.to(opts.dtype()).contiguous()
                                              : at::zeros({args.N}, opts);
  if (use_avx2()) {
    AVX2::norm_fwd_kernel(args, gamma, beta);
  } else {
    DEFAULT::norm_fwd_kernel(args, gamma, beta);
  }
}

void norm_bwd(const NormBwdArgs& args) {
  const auto opts = args.h.options().dtype(compute_dtype(args.h.scalar_type()));
  const at::Tensor gamma = args.gamma.defined() ? args.gamma.to(opts.dtype()).contiguous()
                                                : at::ones({args.N}, opts);
  at::Tensor partials;
  if (args.grad_gamma.defined() || args.grad_beta.defined()) {
    // One partial row per chunk of rows (bwd_chunk_rows: M and N decide the chunks, not the
    // thread count), in float64: dgamma, dbeta (float64 h: each as a double-double).
    const int64_t rows = args.h.scalar_type() == at::kDouble ? 4 : 2;
    partials = at::empty({bwd_chunks(args.M, args.N), rows, args.N}, opts.dtype(at::kDouble));
  }
  if (use_avx2()) {
    AVX2::norm_bwd_kernel(args, gamma, partials);
  } else {
    DEFAULT::norm_bwd_kernel(args, gamma, partials);
  }
  if (partials.defined()) {
    const at::Tensor sums = at::empty({2, args.N}, partials.options());
    if (use_avx2()) {
      AVX2::norm_bwd_reduce_kernel(partials, sums);
    } else {
      DEFAULT::norm_bwd_reduce_kernel(partials, sums);
    }
    if (args.grad_gamma.defined()) args.grad_gamma.copy_(sums[0]);
    if (args.grad_beta.defined()) args.grad_beta.copy_(sums[1]);
  }
}

}  // namespace addnorm::cpu
