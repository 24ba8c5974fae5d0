// CPU kernel of _dropout_apply: out = input * keep-mask / (1 - p), the mask regenerated from
// the seed (ops/dropout_mask.h). Used by the backward of the fused dropout, where it is one
// pass over the gradient, as torch's dropout backward is.

#include <algorithm>
#include <memory>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "cpu/norm_kernel.h"
#include "ops/dropout_mask.h"

namespace addnorm::cpu {

void dropout_apply_kernel(const DropoutApplyArgs& args) {
  const int64_t* s = args.seed.const_data_ptr<int64_t>();
  const DropoutKey key = dropout_key(s[0], s[1], args.p);
  const int64_t n = args.input.numel();
  constexpr int64_t kGrain = 16384;  // a multiple of 4: chunks start on a Philox group
  auto run = [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    using Acc = at::opmath_type<In>;
    const In* in = args.input.const_data_ptr<In>();
    Out* out = args.out.mutable_data_ptr<Out>();
    const Acc scale = static_cast<Acc>(dropout_scale(args.p));
    at::parallel_for(0, (n + kGrain - 1) / kGrain, 1, [&](int64_t c0, int64_t c1) {
      std::unique_ptr<Acc[]> fac(new Acc[kGrain]);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t e0 = c * kGrain;
        const int64_t len = std::min(kGrain, n - e0);
        dropout_factors(key, scale, e0, len, fac.get());
        for (int64_t j = 0; j < len; ++j) {
          out[e0 + j] = static_cast<Out>(static_cast<Acc>(in[e0 + j]) * fac[j]);
        }
      }
    });
  };
  // The dtypes the checks allow: the input's, or float16/bfloat16 out of float32.
  if (args.out.scalar_type() == args.input.scalar_type()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.input.scalar_type(),
                                    "addnorm_dropout_apply_cpu",
                                    [&] { run(scalar_t{}, scalar_t{}); });
  } else if (args.out.scalar_type() == at::kHalf) {
    run(float{}, c10::Half{});
  } else {
    run(float{}, c10::BFloat16{});
  }
}

}  // namespace addnorm::cpu
