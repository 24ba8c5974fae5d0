// CUDA kernel of _dropout_apply: out = input * keep-mask / (1 - p), the mask regenerated from
// the seed (ops/dropout_mask.h), the same function as the CPU kernel's. One thread per group
// of four elements (one Philox call); the seed is read on the device, so a CUDA graph replays
// with the seed of each replay.

#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/dropout_mask.h"
#include "ops/norm_args.h"

namespace addnorm::cuda {
namespace {

template <typename In, typename Out>
__global__ void dropout_apply_kernel(const In* __restrict__ in, Out* __restrict__ out,
                                     int64_t n, const int64_t* __restrict__ seed,
                                     uint64_t threshold, at::opmath_type<In> scale) {
  using A = at::opmath_type<In>;
  const DropoutKey k{static_cast<uint64_t>(__ldg(seed)), static_cast<uint64_t>(__ldg(seed + 1)),
                     threshold};
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto bits = dropout_bits(k, static_cast<uint64_t>(g));
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t e = g * 4 + q;
      if (e < n) {
        const A v = static_cast<A>(in[e]);
        out[e] = static_cast<Out>(dropout_keep(k, bits[q]) ? v * scale : A(0));
      }
    }
  }
}

}  // namespace

void dropout_apply(const DropoutApplyArgs& args) {
  const c10::cuda::CUDAGuard guard(args.input.device());
  const int64_t n = args.input.numel();
  const int64_t groups = (n + 3) / 4;
  constexpr int kThreads = 256;
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int blocks =
      static_cast<int>(std::max<int64_t>(1, std::min((groups + kThreads - 1) / kThreads, max_blocks)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const uint64_t threshold = dropout_threshold(args.p);
  const int64_t* seed = args.seed.const_data_ptr<int64_t>();
  auto launch = [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    dropout_apply_kernel<In, Out><<<blocks, kThreads, 0, stream>>>(
        args.input.const_data_ptr<In>(), args.out.mutable_data_ptr<Out>(), n, seed, threshold,
        static_cast<at::opmath_type<In>>(dropout_scale(args.p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // The dtypes the checks allow: the input's, or float16/bfloat16 out of float32.
  if (args.out.scalar_type() == args.input.scalar_type()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.input.scalar_type(),
                                    "addnorm_dropout_apply_cuda",
                                    [&] { launch(scalar_t{}, scalar_t{}); });
  } else if (args.out.scalar_type() == at::kHalf) {
    launch(float{}, c10::Half{});
  } else {
    launch(float{}, c10::BFloat16{});
  }
}

}  // namespace addnorm::cuda
