#pragma once

// Device helpers shared by the addnorm CUDA kernels: vector loads/stores, the statistics
// accumulators (double, or double-double for float64 data) and row reductions (warp
// shuffles, then shared memory across the warps of a row).
//
// Thread layout used by every row kernel: blockDim.x threads cooperate on one row
// ("threads per row", TPR: a power of two up to 32, or a multiple of 32 up to 1024) and
// blockDim.y rows are processed side by side. For TPR < 32 several rows share a warp;
// their lanes form aligned groups of TPR, so xor shuffles with offsets < TPR stay in the row.

#include <cstdint>
#include <type_traits>

#include <c10/macros/Macros.h>

namespace addnorm::cuda::detail {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;

// VEC elements of U loaded or stored with one (or, for 32-byte vectors, two) wide access.
template <typename U, int VEC>
struct alignas(sizeof(U) * VEC) Vec {
  U val[VEC];
};

// Loads a V at ptr through the read-only data path (ld.global.nc): the kernels' inputs are
// never written while a kernel runs. ptr is aligned to min(sizeof(V), 16) bytes
// (kLoadAlign): a 32-byte V (eight float32 values of a weight, bias, residual or h beside
// 16-bit data) is two 16-byte loads, so a view 16 bytes into a buffer takes the vector paths;
// a 64-byte one (eight float64 values of the dropout) four.
template <typename V>
__device__ __forceinline__ V load_readonly(const void* ptr) {
  V v;
  if constexpr (sizeof(V) >= 16) {  // 16-byte words (float64 dropout vectors: 64 bytes)
    static_assert(sizeof(V) % 16 == 0, "whole 16-byte words");
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(V) / 16); ++i) {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(ptr) + i);
      memcpy(reinterpret_cast<char*>(&v) + 16 * i, &a, 16);
    }
  } else if constexpr (sizeof(V) == 8) {
    const uint2 a = __ldg(reinterpret_cast<const uint2*>(ptr));
    memcpy(&v, &a, 8);
  } else if constexpr (sizeof(V) == 4) {
    const unsigned int a = __ldg(reinterpret_cast<const unsigned int*>(ptr));
    memcpy(&v, &a, 4);
  } else if constexpr (sizeof(V) == 2) {
    const unsigned short a = __ldg(reinterpret_cast<const unsigned short*>(ptr));
    memcpy(&v, &a, 2);
  } else {
    static_assert(sizeof(V) == 1, "a load of 1, 2, 4, 8 or 16k bytes");
    v = *static_cast<const V*>(ptr);
  }
  return v;
}

// The alignment load_readonly needs of VEC elements of U (the stores need sizeof(Vec)).
template <typename U, int VEC>
constexpr size_t kLoadAlign = sizeof(U) * VEC < 16 ? sizeof(U) * VEC : 16;

// Loads VEC elements at ptr (aligned to kLoadAlign<U, VEC>) converted to A.
template <int VEC, typename U, typename A>
__device__ __forceinline__ void load_vec(const U* __restrict__ ptr, A (&dst)[VEC]) {
  const Vec<U, VEC> v = load_readonly<Vec<U, VEC>>(ptr);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    dst[j] = static_cast<A>(v.val[j]);
  }
}

// Stores VEC values converted to U at ptr (aligned to sizeof(Vec<U, VEC>)).
template <int VEC, typename U, typename A>
__device__ __forceinline__ void store_vec(U* __restrict__ ptr, const A (&src)[VEC]) {
  Vec<U, VEC> v;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    v.val[j] = static_cast<U>(src[j]);
  }
  *reinterpret_cast<Vec<U, VEC>*>(ptr) = v;
}

// Rounded arithmetic that the compiler may not fuse into an FMA (nvcc contracts a * b + c
// by default): where the same product feeds two expressions, both must see the same
// rounded value (e.g. g = dy * gamma in backward, so that g - mean(g) is exactly 0 for
// one-element rows).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// ------------------------------------------------------------------------------------------
// Statistics accumulators. Row sums (of h or d = h - shift and of their squares; backward:
// of g, g * d, d and d * d) are accumulated per thread and across threads in double for float32 /
// bfloat16 / float16 data (the product of two floats is exact in double, and a double sum
// of a row's values loses nothing that float32 results can show), and in double-double for
// float64 data (a compensated sum: the error does not grow with the row length).

// value = hi + lo, with lo the accumulated rounding error of hi.
struct DoubleDouble {
  double hi;
  double lo;
};

template <typename A>
struct StatType {
  using type = double;
};
template <>
struct StatType<double> {
  using type = DoubleDouble;
};
template <typename A>
using stat_t = typename StatType<A>::type;

__device__ __forceinline__ void stat_zero(double& s) { s = 0.0; }
__device__ __forceinline__ void stat_zero(DoubleDouble& s) { s = {0.0, 0.0}; }

// s + v and its exact rounding error (Knuth's TwoSum; symmetric in s and v).
__device__ __forceinline__ void two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  const double bb = s - a;
  e = (a - (s - bb)) + (b - bb);
}

// hi + lo += v (a double-double accumulator); an infinite or NaN sum keeps no error term
// (inf - inf would turn it into NaN).
__device__ __forceinline__ void dd_accumulate(double& hi, double& lo, double v) {
  double t, e;
  two_sum(hi, v, t, e);
  hi = t;
  lo = isfinite(t) ? lo + e : 0.0;
}

__device__ __forceinline__ void stat_add(double& s, double v) { s += v; }
__device__ __forceinline__ void stat_add(DoubleDouble& s, double v) {
  dd_accumulate(s.hi, s.lo, v);
}

// a += b; symmetric (merge(a, b) and merge(b, a) are bitwise equal), so both partners of a
// butterfly step hold the same value afterwards.
__device__ __forceinline__ void stat_merge(double& a, double b) { a += b; }
__device__ __forceinline__ void stat_merge(DoubleDouble& a, const DoubleDouble& b) {
  double t, e;
  two_sum(a.hi, b.hi, t, e);
  a.lo = isfinite(t) ? (a.lo + b.lo) + e : 0.0;
  a.hi = t;
}

// s += a * b: fused in double; with the product's rounding error (TwoProd) for double-double.
__device__ __forceinline__ void stat_add_prod(double& s, double a, double b) { s = fma(a, b, s); }
__device__ __forceinline__ void stat_add_prod(DoubleDouble& s, double a, double b) {
  const double p = a * b;
  const double e = fma(a, b, -p);
  double t, f;
  two_sum(s.hi, p, t, f);
  s.lo = isfinite(t) ? s.lo + (f + e) : 0.0;
  s.hi = t;
}

// sums[0] += d (LayerNorm, K = 2) and sums[K - 1] += d * d for d = v - shift. Double sums
// (float data, whose d is exact in double): d rounded. Double-double: d kept exactly as a
// sum of two doubles (TwoSum), so that a shift far from the row's values (its first
// element an outlier) costs the sums none of the bits it cancels; (d + e)^2 = d^2 + 2 d e
// to the sums' precision.
template <int K>
__device__ __forceinline__ void stat_add_dev(double (&sums)[K], double v, double shift) {
  const double d = v - shift;
  if constexpr (K == 2) {
    stat_add(sums[0], d);
  }
  stat_add_prod(sums[K - 1], d, d);
}
template <int K>
__device__ __forceinline__ void stat_add_dev(DoubleDouble (&sums)[K], double v, double shift) {
  double d, e;
  two_sum(v, -shift, d, e);
  if constexpr (K == 2) {
    stat_add(sums[0], d);
  }
  stat_add_prod(sums[K - 1], d, d);
  if (isfinite(d)) {  // (inf / NaN: no error terms, which would be NaN)
    if constexpr (K == 2) {
      sums[0].lo += e;
    }
    sums[K - 1].lo += 2.0 * d * e;
  }
}

__device__ __forceinline__ double stat_value(double s) { return s; }
__device__ __forceinline__ double stat_value(const DoubleDouble& s) { return s.hi + s.lo; }

// A row's length n and 1 / n (computed once on the host): means without a division (a
// division by a variable calls a slow-path subroutine, around which the compiler saves live
// registers).
struct RowLength {
  double n;
  double inv_n;
};

// s / n: s * (1 / n) and one correction step (about half an ulp); for double-double sums the
// low part enters the correction, so a row of N copies of c has mean exactly c.
__device__ __forceinline__ double stat_mean(double s, const RowLength& len) {
  const double q = s * len.inv_n;
  return isfinite(q) ? fma(fma(-q, len.n, s), len.inv_n, q) : q;
}
__device__ __forceinline__ double stat_mean(const DoubleDouble& s, const RowLength& len) {
  const double q = s.hi * len.inv_n;
  return isfinite(q) ? fma(fma(-q, len.n, s.hi) + s.lo, len.inv_n, q) : q;
}

// Mean and variance of a row from the sums of d = h - shift (s1) and of d * d (s2), for float
// data: mean = shift + s1 / n, var = s2 / n - (s1 / n)^2 (its relative error is about
// u * (1 + (shift - mean)^2 / var)). NaN stays NaN; a negative rounding result becomes 0.
__device__ __forceinline__ void shifted_moments(double s1, double s2, const RowLength& len,
                                                double shift, double& mean, double& var) {
  const double m1 = stat_mean(s1, len);
  var = fma(-m1, m1, stat_mean(s2, len));
  var = var < 0.0 ? 0.0 : var;
  mean = shift + m1;
}

// float64 rows: the mean and the variance as double-doubles (value hi + lo), from the
// double-double sums of d = h - shift (s[0], LayerNorm) and of d * d (s[K - 1]); RMSNorm:
// K = 1, shift 0. The subtraction loses nothing the data can show, and shift + s1 / n is
// summed exactly (TwoSum), so a shift far from the mean (the row's first element an outlier)
// costs the mean nothing.
struct DdMoments {
  double mean_hi, mean_lo, var_hi, var_lo;
};

template <int K>
__device__ __forceinline__ DdMoments dd_moments(const DoubleDouble (&s)[K], const RowLength& len,
                                                double shift) {
  DdMoments m{shift, 0.0, 0.0, 0.0};
  const double q1 = K == 2 ? s[0].hi * len.inv_n : 0.0;
  const double q2 = s[K - 1].hi * len.inv_n;
  if (!isfinite(q1) || !isfinite(q2)) {  // (inf / NaN: the IEEE results, no error terms;
    m.var_hi = q2 - q1 * q1;              // an infinite shift is the mean itself)
    m.mean_hi = isfinite(shift) ? shift + q1 : shift;
    return m;
  }
  const double l1 = K == 2 ? (fma(-q1, len.n, s[0].hi) + s[0].lo) * len.inv_n : 0.0;
  const double l2 = (fma(-q2, len.n, s[K - 1].hi) + s[K - 1].lo) * len.inv_n;
  const double p = __dmul_rn(q1, q1);
  const double pl = fma(q1, q1, -p) + 2.0 * q1 * l1;  // (s1 / n)^2 = p + pl
  double v, ve;
  two_sum(q2, -p, v, ve);
  two_sum(v, ve + (l2 - pl), m.var_hi, m.var_lo);
  if (m.var_hi < 0.0 || (m.var_hi == 0.0 && m.var_lo < 0.0)) {  // rounded below 0
    m.var_hi = m.var_lo = 0.0;
  }
  double mh, me;
  two_sum(shift, q1, mh, me);
  two_sum(mh, me + l1, m.mean_hi, m.mean_lo);
  return m;
}

// 1 / sqrt(v) in double, without a division or a square-root subroutine: the hardware
// reciprocal square root refined by one Newton step (within about an ulp). v = 0 gives inf,
// inf gives 0, NaN gives NaN.
__device__ __forceinline__ double rsqrt_of(double v) {
  const double y = rsqrt(v);
  if (!isfinite(y) || y == 0.0) {
    return y;
  }
  const double r = fma(-v * y, y, 1.0);
  return fma(0.5 * y, r, y);
}

// r + r_lo = 1 / sqrt(var + eps) (var = var_hi + var_lo) to about 2^-100 relative: rsqrt_of
// refined by a Newton step in double-double. Zero gives inf, inf gives 0, NaN gives NaN
// (r_lo = 0 in all three). Below 2^-900 (a subnormal eps), where r^2 overflows, var + eps
// is scaled by 2^200 and r by 2^100 (exact).
__device__ __forceinline__ void dd_rstd(double var_hi, double var_lo, double eps, double& r,
                                        double& r_lo) {
  double a, b;
  two_sum(var_hi, eps, a, b);
  b = isfinite(a) ? b + var_lo : 0.0;
  const double scale = a > 0.0 && a < 0x1p-900 ? 0x1p200 : 1.0;
  a *= scale;
  b *= scale;
  r = rsqrt_of(a);
  r_lo = 0.0;
  if (!isfinite(r) || r == 0.0) {
    return;
  }
  const double q = __dmul_rn(r, r);
  const double qe = fma(r, r, -q);  // r^2 = q + qe
  const double t = fma(-a, q, 1.0) - (a * qe + b * q);  // 1 - (a + b) r^2
  r_lo = 0.5 * r * t;
  if (scale != 1.0) {
    r *= 0x1p100;
    r_lo *= 0x1p100;
  }
}

__device__ __forceinline__ double shfl_xor(double v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}
__device__ __forceinline__ DoubleDouble shfl_xor(const DoubleDouble& v, int off) {
  return {__shfl_xor_sync(0xffffffffu, v.hi, off), __shfl_xor_sync(0xffffffffu, v.lo, off)};
}

// Sums K accumulators over the threads of a row; every thread of the row gets the same
// result (xor butterflies merge symmetrically, and the cross-warp step merges the per-warp
// values in warp order). smem: at least kMaxWarps * K elements (a row of TPR > 32 threads
// fills a whole CTA's width, so the CTA's rows never need more warps than kMaxWarps).
// Must be reached by every thread of the block (it may call __syncthreads).
template <int K, typename S>
__device__ __forceinline__ void row_allreduce(S (&v)[K], S* smem) {
  const int tpr = blockDim.x;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    if (off < tpr) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        stat_merge(v[k], shfl_xor(v[k], off));
      }
    }
  }
  if (tpr <= kWarpSize) {
    return;
  }
  const int warps = tpr / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  S* row_smem = smem + threadIdx.y * warps * K;
  __syncthreads();  // the previous reduction's readers are done with smem
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      row_smem[warp * K + k] = v[k];
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = row_smem[k];
  }
  for (int w = 1; w < warps; ++w) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      stat_merge(v[k], row_smem[w * K + k]);
    }
  }
}

}  // namespace addnorm::cuda::detail
