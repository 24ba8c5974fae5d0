// The CPU backend: registers the CPU kernels of _norm_fwd and _norm_bwd, runs the build for
// this processor's instruction set (ATen's choice, so ATEN_CPU_CAPABILITY=default selects the
// portable build), and owns the backward's per-chunk dgamma/dbeta partials with their
// fixed-order reduction.

#include <string>

#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/norm_cpu.h"
#include "cpu/norm_kernel.h"
#include "ops/norm_register.h"

namespace addnorm::cpu {
namespace {

// The kernels of one instruction set.
struct Kernels {
  const char* name;
  void (*fwd)(const NormFwdArgs&);
  void (*bwd)(const NormBwdArgs&, const at::Tensor&);
  void (*reduce)(const at::Tensor&, const at::Tensor&, const at::Tensor&);
  void (*dropout)(const DropoutApplyArgs&);
};

#define ADDNORM_CPU_KERNELS(CAP)                                                      \
  Kernels {                                                                           \
    #CAP, &CAP::norm_fwd_kernel, &CAP::norm_bwd_kernel, &CAP::norm_bwd_reduce_kernel, \
        &CAP::dropout_apply_kernel                                                    \
  }

// ATen's choice (its ATEN_CPU_CAPABILITY override included), read once.
const Kernels& kernels() {
  static const Kernels k = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return ADDNORM_CPU_KERNELS(AVX512);
    if (cap == "AVX2") return ADDNORM_CPU_KERNELS(AVX2);
    return ADDNORM_CPU_KERNELS(DEFAULT);
  }();
  return k;
}

#undef ADDNORM_CPU_KERNELS

void norm_fwd(const NormFwdArgs& args) { kernels().fwd(args); }

void norm_bwd(const NormBwdArgs& args) {
  at::Tensor partials;
  if (args.grad_gamma.defined() || args.grad_beta.defined()) {
    // One partial row per chunk of rows (bwd_chunk_rows: M and N decide the chunks, not the
    // thread count), in float64: dgamma, dbeta (float64 h: each as a double-double).
    const int64_t rows = args.dtypes.stat == at::kDouble ? 4 : 2;
    partials = at::empty({bwd_chunks(args.M, args.N), rows, args.N},
                         args.h.options().dtype(at::kDouble));
  }
  kernels().bwd(args, partials);
  if (partials.defined()) {
    kernels().reduce(partials, args.grad_gamma, args.grad_beta);
  }
}

void dropout_apply(const DropoutApplyArgs& args) { kernels().dropout(args); }

}  // namespace

const char* capability() { return kernels().name; }

TORCH_LIBRARY_IMPL(addnorm, CPU, m) {
  // (The CPU backward reads each element of h and grad_out before it writes its outputs
  // there, never after: see norm_kernel.cpp's Backward.)
  register_norm_kernels<&norm_fwd, &norm_bwd, &dropout_apply, /*kBwdOverInputs=*/true>(m);
}

}  // namespace addnorm::cpu
