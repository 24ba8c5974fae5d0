#pragma once

// The keep-mask of addnorm's fused dropout, one function for the CPU and the CUDA kernels,
// so that the same seed gives the same mask on both devices.
//
// A call is keyed by a seed tensor (int64 [2]: key, counter offset), drawn from torch's
// generator by the caller (functional forms, modules, C++ API) and passed to the op as an
// input: the mask is a pure function of the op's inputs, so backward, activation
// checkpointing and any recompute regenerate it, and nothing is stored.
// Element e (the row-major index in the input's logical shape) draws 16 bits: half e % 2
// (the low half first) of word (e / 2) % 4 of Philox4x32-10(key, counter = (offset, e / 8)),
// one call for eight elements. With threshold T = (1 - p) * 2^32 rounded down, it is kept
// when those bits are below T / 2^16 (integer part), dropped when above; where they are
// equal (probability 2^-16), the same bits of the tie draw, Philox at counter
// (offset, e / 8 + 2^63), decide: kept when below T % 2^16. The keep probability is
// T / 2^32 exactly, as a 32-bit comparison per element gives, at half the generator's work.
// Kept elements are multiplied by 1 / (1 - p), dropped ones by 0 (a dropped inf or NaN gives
// NaN, as torch's dropout product does; p = 1 drops everything).

#include <cmath>
#include <cstdint>

#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/macros/Macros.h>

// A function the compiler keeps out of line, host and device.
#if defined(__CUDACC__)
#define ADDNORM_NOINLINE __noinline__
#elif defined(_MSC_VER)
#define ADDNORM_NOINLINE __declspec(noinline)
#else
#define ADDNORM_NOINLINE __attribute__((noinline))
#endif

namespace addnorm {

struct DropoutKey {
  uint64_t seed = 0;
  uint64_t offset = 0;
  uint64_t threshold = 0;  // (1 - p) * 2^32 rounded down (0: drop all; 2^32: keep all)
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

// The eight elements of a Philox call, and the counters of the tie draws (the top bit of the
// 64-bit group index, which e / 8 never reaches).
constexpr int kDropoutGroup = 8;
constexpr uint64_t kDropoutTieGroup = uint64_t{1} << 63;

// The four random 32-bit words of group g (elements 8 g ... 8 g + 7): the first block of
// ATen's Philox engine at (seed, subsequence = g, offset), i.e. counter (offset, g).
C10_HOST_DEVICE inline at::detail::UINT4 dropout_bits(const DropoutKey& k, uint64_t group) {
  at::philox_engine engine(k.seed, group, k.offset);
  at::detail::UINT4 bits;
  bits[0] = engine();
  bits[1] = engine();
  bits[2] = engine();
  bits[3] = engine();
  return bits;
}

// The 16 bits of element i (0 ... 7) of a group, from the group's words.
C10_HOST_DEVICE inline uint32_t dropout_half(uint32_t word, int i) {
  return (i & 1) != 0 ? word >> 16 : word & 0xFFFFu;
}

// The word q (0 ... 3) of a group's words, by selection (no indexed array: on the device
// that would live in local memory).
C10_HOST_DEVICE inline uint32_t dropout_word(const at::detail::UINT4& bits, int q) {
  return q == 0 ? bits[0] : q == 1 ? bits[1] : q == 2 ? bits[2] : bits[3];
}

// The tie draws of elements e0 + j for the bits j set in ties (elements of e0's group of
// eight): bit j of the result set where element e0 + j is kept, its bits of the tie group
// below T % 2^16.
// (Not inlined: a second generator in every kernel's body, for a branch taken once in 65536
// elements, would raise the register pressure of the common path; inlined, the one-element
// looping kernels took 2-19 registers more than with the call. The key by value: an address
// taken on the device would put it in local memory.)
C10_HOST_DEVICE ADDNORM_NOINLINE inline uint32_t dropout_ties(DropoutKey k, uint64_t e0,
                                                              uint32_t ties) {
  const auto bits = dropout_bits(k, (e0 / kDropoutGroup) | kDropoutTieGroup);
  const auto lo = static_cast<uint32_t>(k.threshold & 0xFFFFu);
  uint32_t kept = 0;
  for (int j = 0; j < kDropoutGroup; ++j) {
    const int i = static_cast<int>((e0 + j) % kDropoutGroup);
    if ((ties >> j & 1u) != 0 && dropout_half(dropout_word(bits, i >> 1), i) < lo) {
      kept |= 1u << j;
    }
  }
  return kept;
}

// The threshold's high half, against which an element's 16 bits are compared (2^16 keeps
// all).
C10_HOST_DEVICE inline uint32_t dropout_threshold_hi(const DropoutKey& k) {
  return static_cast<uint32_t>(k.threshold >> 16);
}

// Whether element e, whose 16 bits are r, is kept.
C10_HOST_DEVICE inline bool dropout_keep(const DropoutKey& k, uint64_t e, uint32_t r) {
  const uint32_t hi = dropout_threshold_hi(k);
  return r != hi ? r < hi : dropout_ties(k, e, 1u) != 0;
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
    const auto bits = dropout_bits(k, static_cast<uint64_t>(e) / kDropoutGroup);
    for (int i = static_cast<int>(e % kDropoutGroup); i < kDropoutGroup && e < end; ++i, ++e) {
      const uint32_t r = dropout_half(bits[i >> 1], i);
      fac[e - e0] = dropout_keep(k, static_cast<uint64_t>(e), r) ? scale : A(0);
    }
  }
}

}  // namespace addnorm
