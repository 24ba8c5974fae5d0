#pragma once

// The keep-mask of addnorm's fused dropout, one function for the CPU and the CUDA kernels,
// so that the same seed gives the same mask on both devices.
//
// A call is keyed by a seed tensor (int64 [2]: key, counter offset), drawn from torch's
// generator by the caller (functional forms, modules, C++ API) and passed to the op as an
// input: the mask is a pure function of the op's inputs, so backward, activation
// checkpointing and any recompute regenerate it, and nothing is stored.
// Element e (the row-major index in the input's logical shape) is kept when output e % 4
// of Philox4x32-10(key, counter = (offset, e / 4)) is below threshold = (1 - p) * 2^32;
// kept elements are multiplied by 1 / (1 - p), dropped ones by 0 (a dropped inf or NaN gives
// NaN, as torch's dropout product does; p = 1 drops everything).

#include <cmath>
#include <cstdint>

#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/macros/Macros.h>

namespace addnorm {

struct DropoutKey {
  uint64_t seed = 0;
  uint64_t offset = 0;
  uint64_t threshold = 0;  // keep when bits < threshold (0: drop all; 2^32: keep all)
};

inline uint64_t dropout_threshold(double p) {
  // (1 - p) * 2^32, rounded down; p in [0, 1].
  return static_cast<uint64_t>(std::ldexp(1.0 - p, 32));
}

// The scale of kept elements in the compute type A (float, or double for float64 data):
// 1 / (1 - p) as torch's dropout rounds it (mask / (1 - p): 1 - p rounded to A, then the
// reciprocal), 0 for p = 1.
template <typename A>
inline A dropout_scale(double p) {
  return p < 1.0 ? A(1) / static_cast<A>(1.0 - p) : A(0);
}

// Four random 32-bit words for elements 4 * group ... 4 * group + 3: the first block of
// ATen's Philox engine at (seed, subsequence = group, offset), i.e. counter (offset, group).
C10_HOST_DEVICE inline at::detail::UINT4 dropout_bits(const DropoutKey& k, uint64_t group) {
  at::philox_engine engine(k.seed, group, k.offset);
  at::detail::UINT4 bits;
  bits[0] = engine();
  bits[1] = engine();
  bits[2] = engine();
  bits[3] = engine();
  return bits;
}

C10_HOST_DEVICE inline bool dropout_keep(const DropoutKey& k, uint32_t bits) {
  return static_cast<uint64_t>(bits) < k.threshold;
}

// The key of a call: seed tensor values (read where they live) and p.
inline DropoutKey dropout_key(int64_t seed, int64_t offset, double p) {
  return {static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_threshold(p)};
}

// The factors of elements [e0, e0 + n) of a call, host side: scale where kept, 0 where
// dropped.
template <typename A>
void dropout_factors(const DropoutKey& k, A scale, int64_t e0, int64_t n, A* fac) {
  int64_t e = e0;
  const int64_t end = e0 + n;
  while (e < end) {
    const auto bits = dropout_bits(k, static_cast<uint64_t>(e) >> 2);
    for (int q = static_cast<int>(e & 3); q < 4 && e < end; ++q, ++e) {
      fac[e - e0] = dropout_keep(k, bits[q]) ? scale : A(0);
    }
  }
}

}  // namespace addnorm
