// CPU kernels of the fused Add & Norm ops: one template serves LayerNorm and RMSNorm,
// with and without residual, for float32/float16/bfloat16 and mixed dtypes; float64 has
// kernels of its own.
//
// Compiled once per instruction set: CPU_CAPABILITY names the namespace (DEFAULT, AVX2,
// AVX512) and selects at::vec's implementation (AVX512: 16 float / 8 double lanes). Rows are split across threads with
// at::parallel_for; a row lives in a scratch buffer (L1/L2) between its passes, so memory
// sees each input read once and each output written once.
//
// Numerics. float32/float16/bfloat16 data: the row statistics (the sums of h - shift and
// of its square, shift the row's first h, in one sweep; two-pass where that would lose
// bits) are summed in double lanes, the float lanes converted in registers; the sum of
// squares of any finite float row fits a double. The forward output: float32 in double
// lanes, rounded once; float16/bfloat16 in float lanes with mean and rstd split into their
// float value plus the rounding error of the double statistics (AVX2 and AVX-512, whose
// multiply-add is fused), or in double lanes for rows where that split is not exact or
// h - mean could overflow float (rstd outside [2^-100, 2^100], N * var above 2^250), and
// in the portable build. The backward runs in double lanes, with the statistics of h itself when the forward's eps is
// given (see Backward), and rounds grad_h once.
// float64 data: double-double sums (TwoSum / TwoProd lanes), statistics and outputs to
// about one rounding; rows whose sums overflow, or whose squares underflow with eps ~ 0,
// are summed again scaled by a power of two.

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/norm_kernel.h"
#include "ops/dropout_mask.h"

namespace addnorm::cpu {
namespace CPU_CAPABILITY {
namespace {

// x86 builds with fused multiply-add and 256-bit integer lanes (AVX2 and AVX512).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define ADDNORM_X86_SIMD 1
#endif

using at::vec::Vectorized;
using VF = Vectorized<float>;
using VD = Vectorized<double>;
static_assert(VF::size() == 2 * VD::size(), "a float vector widens to two double vectors");

// Compute type of the memory passes: float for float/half/bfloat16, double for double.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// Moves kWidth = 2 * Vectorized<A>::size() elements between memory of type T and two
// compute vectors of type A = acc_t<T>. (Two vectors: one 16-lane bf16 load on AVX2.)
template <typename T>
struct Pack {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t kWidth = 2 * V::size();

  static void load(const T* p, V& a, V& b) {
    if constexpr (is_reduced_v<T>) {
      at::vec::load_to_float<T>(p, a, b);
    } else {
      a = V::loadu(p);
      b = V::loadu(p + V::size());
    }
  }
  static void store(T* p, const V& a, const V& b) {
    if constexpr (is_reduced_v<T>) {
      at::vec::convert_from_float<T>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + V::size());
    }
  }
  // Round a and b to T (what storing them in T and reloading gives); store them to p
  // unless p is null. One conversion serves both.
  static void round_store(T* p, V& a, V& b) {
    if constexpr (is_reduced_v<T>) {
      const auto t = at::vec::convert_from_float<T>(a, b);
      if (p) t.store(p);
      auto r = at::vec::convert_to_float<T>(t);
      a = std::get<0>(r);
      b = std::get<1>(r);
    } else {
      if (p) store(p, a, b);
    }
  }
};

template <typename A, typename T>
inline A to_acc(T v) {
  return static_cast<A>(v);
}

// ---------------------------------------------------------------------------------------
// Double lanes.

// A float vector as two double vectors (its lower and upper halves), and back (rounded).
inline void widen(const VF& v, VD& lo, VD& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 f = v;
  lo = VD(_mm512_cvtps_pd(_mm512_castps512_ps256(f)));
  hi = VD(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1))));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 f = v;
  lo = VD(_mm256_cvtps_pd(_mm256_castps256_ps128(f)));
  hi = VD(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
#else
  __at_align__ float f[VF::size()];
  __at_align__ double d[VF::size()];
  v.store(f);
  for (int64_t k = 0; k < VF::size(); ++k) d[k] = f[k];
  lo = VD::loadu(d);
  hi = VD::loadu(d + VD::size());
#endif
}

// The VF::size() floats at p as two double vectors (converted as they are loaded).
inline void widen_load(const float* p, VD& lo, VD& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  lo = VD(_mm512_cvtps_pd(_mm256_loadu_ps(p)));
  hi = VD(_mm512_cvtps_pd(_mm256_loadu_ps(p + VD::size())));
#elif defined(CPU_CAPABILITY_AVX2)
  lo = VD(_mm256_cvtps_pd(_mm_loadu_ps(p)));
  hi = VD(_mm256_cvtps_pd(_mm_loadu_ps(p + VD::size())));
#else
  widen(VF::loadu(p), lo, hi);
#endif
}

// The 2 * VF::size() elements of T at p (one Pack) as four double vectors.
template <typename T>
inline void widen_pack(const T* p, VD& d0, VD& d1, VD& d2, VD& d3) {
  if constexpr (std::is_same_v<T, float>) {
    widen_load(p, d0, d1);
    widen_load(p + VF::size(), d2, d3);
  } else {
    VF a, b;
    Pack<T>::load(p, a, b);
    widen(a, d0, d1);
    widen(b, d2, d3);
  }
}

// One Pack of T at p (2 * VF::size() elements), widened half by half: half(k) gives
// elements [k * VF::size(), (k + 1) * VF::size()) as two double vectors (float: converted
// as they are loaded; reduced types: converted to float once, then widened).
template <typename T>
struct WidePack {
  const T* p;
  VF a, b;
  explicit WidePack(const T* ptr) : p(ptr) {
    if constexpr (!std::is_same_v<T, float>) {
      Pack<T>::load(p, a, b);
    }
  }
  void half(int k, VD& lo, VD& hi) const {
    if constexpr (std::is_same_v<T, float>) {
      widen_load(p + k * VF::size(), lo, hi);
    } else {
      widen(k == 0 ? a : b, lo, hi);
    }
  }
};

// The next row's streams, asked for into L2 while the last pass over this row runs from
// cache: the hardware prefetchers stop at 4 KiB pages, a 1024-wide float row, so each row's
// first pass would otherwise start by waiting on memory. Two streams, or none after a
// chunk's last row.
struct NextRow {
  static constexpr int64_t kStepBytes = 128;  // the most one fetch covers per stream
  const char* a = nullptr;
  const char* b = nullptr;
  int64_t a_size = 0, b_size = 0;  // element sizes
  NextRow() = default;
  template <typename A, typename B>
  NextRow(const A* pa, const B* pb)
      : a(reinterpret_cast<const char*>(pa)), b(reinterpret_cast<const char*>(pb)),
        a_size(sizeof(A)), b_size(sizeof(B)) {}
  // The lines of both streams' kStepBytes from element j. (A fixed count: GCC deletes a
  // loop of prefetches whose trip count it does not know.)
  void fetch(int64_t j) const {
    if (a == nullptr) return;
    __builtin_prefetch(a + j * a_size, 0, 2);
    __builtin_prefetch(a + j * a_size + 64, 0, 2);
    __builtin_prefetch(b + j * b_size, 0, 2);
    __builtin_prefetch(b + j * b_size + 64, 0, 2);
  }
};

inline VF narrow(const VD& lo, const VD& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512d l = _mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(lo)));
  return VF(_mm512_castpd_ps(_mm512_insertf64x4(l, _mm256_castps_pd(_mm512_cvtpd_ps(hi)), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  return VF(_mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(lo)),
                                 _mm256_cvtpd_ps(hi), 1));
#else
  __at_align__ double d[VF::size()];
  __at_align__ float f[VF::size()];
  lo.store(d);
  hi.store(d + VD::size());
  for (int64_t k = 0; k < VF::size(); ++k) f[k] = static_cast<float>(d[k]);
  return VF::loadu(f);
#endif
}

// The sum of v's lanes, pairwise in lane order.
inline double reduce_add(const VD& v) {
  __at_align__ double t[VD::size()];
  v.store(t);
  for (int64_t w = VD::size() / 2; w > 0; w /= 2) {
    for (int64_t k = 0; k < w; ++k) t[k] = t[2 * k] + t[2 * k + 1];
  }
  return t[0];
}

// a * b + c; fused where the instruction set has it (accuracy, not exactness).
template <typename S>
inline S fma_of(const S& a, const S& b, const S& c) {
  if constexpr (std::is_floating_point_v<S>) {
    return std::fma(a, b, c);
  } else {
    return at::vec::fmadd(a, b, c);
  }
}

// a * b - c with one rounding, always (the error-free transformations need it).
inline double fms_exact(double a, double b, double c) { return std::fma(a, b, -c); }
inline VD fms_exact(const VD& a, const VD& b, const VD& c) {
#if defined(ADDNORM_X86_SIMD)
  return at::vec::fmsub(a, b, c);
#else
  __at_align__ double x[VD::size()], y[VD::size()], z[VD::size()];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int64_t k = 0; k < VD::size(); ++k) x[k] = std::fma(x[k], y[k], -z[k]);
  return VD::loadu(x);
#endif
}

// a * b + c with one rounding, always.
inline double fma_exact(double a, double b, double c) { return std::fma(a, b, c); }
inline VD fma_exact(const VD& a, const VD& b, const VD& c) {
#if defined(ADDNORM_X86_SIMD)
  return at::vec::fmadd(a, b, c);
#else
  __at_align__ double x[VD::size()], y[VD::size()], z[VD::size()];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int64_t k = 0; k < VD::size(); ++k) x[k] = std::fma(x[k], y[k], z[k]);
  return VD::loadu(x);
#endif
}

// Error-free transformations (S = double or VD): s + e = a + b (Knuth's TwoSum) and
// p + e = a * b (TwoProd), exactly, for finite values.
template <typename S>
inline void two_sum(const S& a, const S& b, S& s, S& e) {
  s = a + b;
  const S bb = s - a;
  e = (a - (s - bb)) + (b - bb);
}

template <typename S>
inline void two_prod(const S& a, const S& b, S& p, S& e) {
  p = a * b;
  e = fms_exact(a, b, p);
}

// hi + lo += v (double-double accumulation; lo collects the rounding errors of hi).
template <typename S>
inline void dd_add(S& hi, S& lo, const S& v) {
  S s, e;
  two_sum(hi, v, s, e);
  hi = s;
  lo = lo + e;
}

// hi + lo, or hi alone where hi is not finite (an infinite sum leaves NaN error terms).
inline double dd_value(double hi, double lo) { return std::isfinite(hi) ? hi + lo : hi; }
inline VD dd_value(const VD& hi, const VD& lo) {
  const VD z = hi - hi;  // 0 where hi is finite, NaN elsewhere
  return VD::blendv(hi + lo, hi, z != z);
}

// A double-double scalar: value hi + lo.
struct DD {
  double hi = 0.0;
  double lo = 0.0;
  void add(double v) { dd_add(hi, lo, v); }
  void add(const DD& v) {
    add(v.hi);
    lo += v.lo;
  }
  double value() const { return dd_value(hi, lo); }
};

// q + q_lo = s / n to about 2^-100 relative (n: a row length, exact in double), q the
// double nearest to it (s is normalized first: its parts may overlap, even cancel).
inline void dd_div(const DD& s, double n, double& q, double& q_lo) {
  double hi = s.hi, lo = s.lo;
  if (std::isfinite(hi)) two_sum(s.hi, s.lo, hi, lo);
  q = hi / n;
  q_lo = std::isfinite(q) ? (fma_exact(-q, n, hi) + lo) / n : 0.0;
}

// r + r_lo = 1 / sqrt(a + b) (a + b a double-double, a >= 0) to about 2^-100 relative:
// the double result refined by one Newton step evaluated in double-double. Zero gives
// inf, inf gives 0, NaN gives NaN (r_lo = 0 in all three). Below 2^-900 (a subnormal eps),
// where r^2 overflows, a + b is scaled by 2^200 and r by 2^100 (exact).
inline void dd_rsqrt(double a, double b, double& r, double& r_lo) {
  if (a > 0.0 && a < 0x1p-900) {
    dd_rsqrt(a * 0x1p200, b * 0x1p200, r, r_lo);
    r *= 0x1p100;
    r_lo *= 0x1p100;
    return;
  }
  r = 1.0 / std::sqrt(a);
  r_lo = 0.0;
  if (!std::isfinite(r) || r == 0.0) return;
  double q, qe;
  two_prod(r, r, q, qe);  // r^2 = q + qe
  const double t = fma_exact(-a, q, 1.0) - (a * qe + b * q);  // 1 - (a + b) r^2
  r_lo = 0.5 * r * t;
}

// ---------------------------------------------------------------------------------------
// Row sums. Rows are summed in blocks of kBlock elements: double lanes accumulate a block
// (512 values per lane: an error below 2^-43 of the block's magnitude), the blocks' totals
// are added as a double-double, so the error does not grow with N.
constexpr int64_t kBlock = 8192;

// Lanes of a block's sum: double lanes for float values (float_sum), double-double lanes
// for double vectors (blocked_sum; add(a0, a1) takes the two vectors of one step).
template <typename A>
struct Lanes;

template <>
struct Lanes<float> {
  VD s0{0.0}, s1{0.0}, s2{0.0}, s3{0.0};
  double tail = 0.0;
  // The 2 * VF::size() floats at p.
  void add(const float* p) {
    VD x0, x1, x2, x3;
    widen_pack(p, x0, x1, x2, x3);
    s0 = s0 + x0;
    s1 = s1 + x1;
    s2 = s2 + x2;
    s3 = s3 + x3;
  }
  // Squared deviations from mean (in double) of the 2 * VF::size() floats at p.
  void add_sq_dev(const float* p, const VD& mean) {
    VD x0, x1, x2, x3;
    widen_pack(p, x0, x1, x2, x3);
    x0 = x0 - mean;
    x1 = x1 - mean;
    x2 = x2 - mean;
    x3 = x3 - mean;
    s0 = fma_of(x0, x0, s0);
    s1 = fma_of(x1, x1, s1);
    s2 = fma_of(x2, x2, s2);
    s3 = fma_of(x3, x3, s3);
  }
  void add_scalar(double v) { tail += v; }
  DD total() const {
    DD t;
    t.add(reduce_add((s0 + s1) + (s2 + s3)));
    t.add(tail);
    return t;
  }
};

// a where b is finite, else b.
inline double finite_or(double a, double b) { return std::isfinite(b) ? a : b; }
inline VD finite_or(const VD& a, const VD& b) {
  const VD z = b - b;  // 0 where b is finite, NaN elsewhere
  return VD::blendv(a, b, z != z);
}

// (v - mean_hi - mean_lo)^2 as p + e (the square of the exact difference to about 2^-104).
// The difference d + d_lo is renormalized (|d_lo| <= ulp(d) / 2) before it is squared:
// v - mean_hi is often exact, which leaves -mean_lo as its low part, as large as the high
// part where v is within an ulp of the mean, and dh^2 + 2 dh dl then lacks dl^2 (a constant
// row's variance came out as -mean_lo^2: NaN). An infinite v keeps its square, inf, as IEEE
// arithmetic on the math gives it (renormalized, it would be NaN).
template <typename S>
inline void sq_dev(const S& v, const S& neg_mean_hi, const S& mean_lo, S& p, S& e) {
  S dh, dl, d, d_lo;
  two_sum(v, neg_mean_hi, dh, dl);
  two_sum(dh, dl - mean_lo, d, d_lo);
  d = finite_or(d, dh);
  two_prod(d, d, p, e);
  e = fma_of(d + d, d_lo, e);
}

template <>
struct Lanes<double> {
  VD hi0{0.0}, lo0{0.0}, hi1{0.0}, lo1{0.0};
  DD tail;
  void add(const VD& a0, const VD& a1) {
    dd_add(hi0, lo0, a0);
    dd_add(hi1, lo1, a1);
  }
  void add_sq_dev(const VD& a0, const VD& a1, const VD& neg_mean_hi, const VD& mean_lo) {
    VD p, e;
    sq_dev(a0, neg_mean_hi, mean_lo, p, e);
    dd_add(hi0, lo0, p);
    lo0 = lo0 + e;
    sq_dev(a1, neg_mean_hi, mean_lo, p, e);
    dd_add(hi1, lo1, p);
    lo1 = lo1 + e;
  }
  void add_scalar(double v) { tail.add(v); }
  void add_scalar_sq_dev(double v, double neg_mean_hi, double mean_lo) {
    double p, e;
    sq_dev(v, neg_mean_hi, mean_lo, p, e);
    tail.add(p);
    tail.lo += e;
  }
  DD total() const {
    __at_align__ double h[2 * VD::size()];
    hi0.store(h);
    hi1.store(h + VD::size());
    DD t = tail;
    for (double v : h) t.add(v);
    t.lo += reduce_add(lo0 + lo1);
    return t;
  }
};

// Sum over j < n of the doubles that fv(j) (two double vectors at j, W = 2 * VD::size()
// elements) and fs(j) (one element at j) produce, in double-double lanes.
template <typename FV, typename FS>
DD blocked_sum(int64_t n, const FV& fv, const FS& fs) {
  constexpr int64_t W = 2 * VD::size();
  DD total;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Lanes<double> acc;
    int64_t j = b0;
    for (; j + W <= b1; j += W) {
      VD a0, a1;
      fv(j, a0, a1);
      acc.add(a0, a1);
    }
    for (; j < b1; ++j) {
      acc.add_scalar(static_cast<double>(fs(j)));
    }
    total.add(acc.total());
  }
  return total;
}

// Sum over j < n of v_j (sq_dev = false) or of (v_j - mean)^2 (sq_dev = true), for floats.
template <bool kSqDev>
DD float_sum(const float* v, int64_t n, double mean) {
  constexpr int64_t W = 2 * VF::size();
  const VD mean_v(mean);
  DD total;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Lanes<float> acc;
    int64_t j = b0;
    for (; j + W <= b1; j += W) {
      if constexpr (kSqDev) {
        acc.add_sq_dev(v + j, mean_v);
      } else {
        acc.add(v + j);
      }
    }
    for (; j < b1; ++j) {
      const double d = static_cast<double>(v[j]) - mean;
      acc.add_scalar(kSqDev ? d * d : d);
    }
    total.add(acc.total());
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// float64 statistics.

// Mean (LayerNorm) and rstd of the row v * scale as double-doubles; scale is a power of two
// (1 but for rows beyond the range of the squares): mean(v) = (mean_hi + mean_lo) / scale,
// rstd(v) = (rstd_hi + rstd_lo) * scale.
struct F64Stats {
  double mean_hi = 0.0, mean_lo = 0.0;
  double rstd_hi = 0.0, rstd_lo = 0.0;
  double scale = 1.0;
  double sum_sq = 0.0;  // sum of squared deviations at that scale (its leading part)
};

// Statistics of v * scale, given its sum (LayerNorm).
F64Stats f64_stats_at(const double* v, int64_t n, double eps, bool rms, double scale,
                      const DD& sum) {
  F64Stats st;
  st.scale = scale;
  const double nd = static_cast<double>(n);
  if (!rms) dd_div(sum, nd, st.mean_hi, st.mean_lo);
  constexpr int64_t W = 2 * VD::size();
  const VD scale_v(scale), neg_mean_v(-st.mean_hi), mean_lo_v(st.mean_lo);
  DD sq;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    Lanes<double> acc;
    int64_t j = b0;
    for (; j + W <= b1; j += W) {
      acc.add_sq_dev(VD::loadu(v + j) * scale_v, VD::loadu(v + j + VD::size()) * scale_v,
                     neg_mean_v, mean_lo_v);
    }
    for (; j < b1; ++j) acc.add_scalar_sq_dev(v[j] * scale, -st.mean_hi, st.mean_lo);
    sq.add(acc.total());
  }
  st.sum_sq = sq.hi;
  double var, var_lo;
  dd_div(sq, nd, var, var_lo);
  double a, b;
  two_sum(var, eps * scale * scale, a, b);  // var + eps, both at the row's scale
  dd_rsqrt(a, std::isfinite(a) ? b + var_lo : 0.0, st.rstd_hi, st.rstd_lo);
  return st;
}

// Statistics of a float64 row v given its sum. Rows whose sums overflow, or whose squared
// deviations underflow while eps is below the normal range (eps = 0), are summed again
// scaled by a power of two that brings max |v| near 1. Rows holding infinities or NaN keep
// the IEEE results of the plain sums.
F64Stats f64_stats(const double* v, int64_t n, double eps, bool rms, const DD& sum) {
  F64Stats st = f64_stats_at(v, n, eps, rms, 1.0, sum);
  const bool fits = std::isfinite(sum.hi) && std::isfinite(st.sum_sq) &&
                    (eps >= std::numeric_limits<double>::min() || st.sum_sq >= 0x1p-968);
  if (fits) return st;
  double max_abs = 0.0;
  bool finite = true;
  for (int64_t j = 0; j < n; ++j) {
    finite = finite && std::isfinite(v[j]);
    max_abs = std::max(max_abs, std::abs(v[j]));
  }
  if (!finite || max_abs == 0.0) return st;
  int e = 0;
  std::frexp(max_abs, &e);  // max_abs = f * 2^e, f in [0.5, 1)
  const double scale = std::ldexp(1.0, std::clamp(-e, -1000, 1000));
  const VD scale_v(scale);
  const DD scaled_sum =
      rms ? DD{}
          : blocked_sum(
                n,
                [&](int64_t j, VD& a0, VD& a1) {
                  a0 = VD::loadu(v + j) * scale_v;
                  a1 = VD::loadu(v + j + VD::size()) * scale_v;
                },
                [&](int64_t j) { return v[j] * scale; });
  const F64Stats scaled = f64_stats_at(v, n, eps, rms, scale, scaled_sum);
  if (rms || scaled.sum_sq != 0.0) return scaled;
  // A constant row (LayerNorm): its mean is v[0] exactly and rstd is 1 / sqrt(eps), at scale
  // 1 (its sum may overflow, and eps * scale^2 underflows for scale < 1): out is the bias.
  F64Stats c;
  c.mean_hi = v[0];
  dd_rsqrt(eps, 0.0, c.rstd_hi, c.rstd_lo);
  return c;
}

// The forward's row moments in one sweep: the sums of d = v - shift and of d * d in double
// lanes (kRms: shift 0, only d * d), blocked as blocked_sum. For float data d and d * d are
// exact in double where the values' exponents are within about 26 of each other (else
// rounded once), so with the shift near the row's values (its first element), var =
// sum(d^2) / N - (sum(d) / N)^2 loses nothing a float result can show; see row_moments
// for the rows where the subtraction could.
template <bool kRms>
struct MomentLanes {
  VD s0{0.0}, s1{0.0}, s2{0.0}, s3{0.0};  // sum of d
  VD q0{0.0}, q1{0.0}, q2{0.0}, q3{0.0};  // sum of d * d
  double s_tail = 0.0, q_tail = 0.0;
  void add(const VF& a0, const VF& a1, const VD& shift) {
    VD x0, x1, x2, x3;
    widen(a0, x0, x1);
    widen(a1, x2, x3);
    add(x0, x1, x2, x3, shift);
  }
  void add(const VD& v0, const VD& v1, const VD& v2, const VD& v3, const VD& shift) {
    VD x0 = v0, x1 = v1, x2 = v2, x3 = v3;
    if constexpr (!kRms) {
      x0 = x0 - shift;
      x1 = x1 - shift;
      x2 = x2 - shift;
      x3 = x3 - shift;
      s0 = s0 + x0;
      s1 = s1 + x1;
      s2 = s2 + x2;
      s3 = s3 + x3;
    }
    q0 = fma_of(x0, x0, q0);
    q1 = fma_of(x1, x1, q1);
    q2 = fma_of(x2, x2, q2);
    q3 = fma_of(x3, x3, q3);
  }
  void add_scalar(double v, double shift) {
    const double d = kRms ? v : v - shift;
    if constexpr (!kRms) s_tail += d;
    q_tail += d * d;
  }
  void total(DD& s, DD& q) const {
    if constexpr (!kRms) {
      s.add(reduce_add((s0 + s1) + (s2 + s3)));
      s.add(s_tail);
    }
    q.add(reduce_add((q0 + q1) + (q2 + q3)));
    q.add(q_tail);
  }
};

// Sums of d and d * d (kRms: only d * d = v * v) over j < n of the float values that fv(j)
// (two float vectors at j, 2 * VF::size() elements) and fs(j) (one element) produce.
template <bool kRms, typename FV, typename FS>
void blocked_moments(int64_t n, double shift, const FV& fv, const FS& fs, DD& s, DD& q) {
  constexpr int64_t W = 2 * VF::size();
  const VD shift_v(shift);
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    MomentLanes<kRms> acc;
    int64_t j = b0;
    for (; j + W <= b1; j += W) {
      VF a0, a1;
      fv(j, a0, a1);
      acc.add(a0, a1, shift_v);
    }
    for (; j < b1; ++j) {
      acc.add_scalar(static_cast<double>(fs(j)), shift);
    }
    acc.total(s, q);
  }
}

// A row's mean and variance (RMSNorm: mean 0, var the mean square) from pass 1's sums
// (s, q: of d = v - shift and of d * d, see MomentLanes). Where the subtraction q / N -
// (s / N)^2 could lose bits a float result shows, (s / N)^2 > 256 var (the shift far from
// the mean compared with the spread: a rare row, e.g. its first element an outlier), and
// for rows with inf or NaN, the two-pass sums over the row v (in float) instead: the mean,
// then the squared deviations from it.
inline void row_moments(bool rms, const DD& s, const DD& q, double shift, const float* v,
                        int64_t n, double& mean, double& var) {
  const double nd = static_cast<double>(n);
  const double m1 = rms ? 0.0 : s.value() / nd;
  var = std::max(q.value() / nd - m1 * m1, 0.0);
  mean = rms ? 0.0 : shift + m1;
  if (rms || m1 * m1 <= 256.0 * var) return;
  mean = float_sum<false>(v, n, 0.0).value() / nd;
  var = float_sum<true>(v, n, mean).value() / nd;
}

// ---------------------------------------------------------------------------------------
// Forward, float32 / float16 / bfloat16
//   x, out: [M, N] T;  residual: [M, N] R;  residual_out: [M, N] H (h = x + residual)
//   gamma, beta: [N] float;  mean, rstd: [M] float

// Whether at::vec::fmadd is a fused multiply-add (the float-lane output relies on it).
#if defined(ADDNORM_X86_SIMD)
constexpr bool kFusedFma = true;
#else
constexpr bool kFusedFma = false;
#endif

// (v - mean) * rstd, with mean = mean_hi + mean_lo and rstd = rstd_hi + rstd_lo given as
// float plus the rounding error of the double statistics, so that rounding mean and rstd
// to float costs no accuracy.
template <typename S>
inline S normalized(const S& v, const S& mean_hi, const S& mean_lo, const S& rstd_hi,
                    const S& rstd_lo) {
  const S d = (v - mean_hi) - mean_lo;
  return fma_of(d, rstd_hi, d * rstd_lo);
}

// out = ((v - mean) * rstd) * gamma + beta in double for one float vector of v.
inline VF normalized_wide(const VF& v, const VF& gamma, const VF& beta, const VD& mean,
                          const VD& rstd) {
  VD v0, v1, g0, g1, b0, b1;
  widen(v, v0, v1);
  widen(gamma, g0, g1);
  widen(beta, b0, b1);
  return narrow(fma_of((v0 - mean) * rstd, g0, b0), fma_of((v1 - mean) * rstd, g1, b1));
}

// The fused dropout's factors of elements [e0, e0 + n) (ops/dropout_mask.h: the same
// values as dropout_factors). AVX512: sixteen Philox counters per round in 32-bit lanes
// (products through _mm512_mul_epu32), each word's two 16-bit halves compared at once into
// masks, interleaved into element order with pdep and written as masked stores of the scale.
// AVX2: eight counters per round. Ties with the threshold (once in 2^16 elements) and the ends
// go through the scalar functions.
template <typename A>
void dropout_factors_fast(const DropoutKey& k, A scale, int64_t e0, int64_t n, A* fac) {
  if (k.threshold > 0xFFFFFFFFu) {  // 1 - p rounds to 1 (p below 2^-53): every element kept
    std::fill(fac, fac + n, scale);
    return;
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // threshold < 2^32 (above): its high half fits 16 bits.
  const auto thr_hi = static_cast<uint16_t>(k.threshold >> 16);
  const int64_t head = std::min<int64_t>(n, (kDropoutGroup - e0 % kDropoutGroup) % kDropoutGroup);
  dropout_factors(k, scale, e0, head, fac);
  int64_t e = e0 + head;
  const int64_t end = e0 + n;
#endif
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i thr = _mm512_set1_epi16(static_cast<int16_t>(thr_hi));
  const __m512i sa = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i sb = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  auto mulhilo = [](__m512i a, __m512i x, __m512i& hi) {
    const __m512i even = _mm512_mul_epu32(a, x);
    const __m512i odd = _mm512_mul_epu32(a, _mm512_srli_epi64(x, 32));
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    return _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  };
  auto word = [](uint64_t v) { return _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(v))); };
  for (; e + 16 * kDropoutGroup <= end; e += 16 * kDropoutGroup) {
    const uint64_t g = static_cast<uint64_t>(e) / kDropoutGroup;
    __m512i c0 = word(k.offset);
    __m512i c1 = word(k.offset >> 32);
    __m512i c2 = _mm512_add_epi32(word(g), lane);
    __m512i c3 = word(g >> 32);
    if (static_cast<uint32_t>(g) > 0xFFFFFFF0u) {  // the low word wraps inside the 16 groups
      alignas(64) uint32_t hi_words[16];
      for (int i = 0; i < 16; ++i) hi_words[i] = static_cast<uint32_t>((g + i) >> 32);
      c3 = _mm512_load_si512(hi_words);
    }
    __m512i k0 = word(k.seed);
    __m512i k1 = word(k.seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round > 0) {
        k0 = _mm512_add_epi32(k0, word(0x9E3779B9u));
        k1 = _mm512_add_epi32(k1, word(0xBB67AE85u));
      }
      __m512i hi0, hi1;
      const __m512i lo0 = mulhilo(sa, c0, hi0);
      const __m512i lo1 = mulhilo(sb, c2, hi1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), k0);
      c1 = lo1;
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), k1);
      c3 = lo0;
    }
    // Element 8 i + 2 q + s is half s of word q of counter i: bit 2 i + s of that word's
    // 16-bit compares, bit 8 i + 2 q + s of keep (keep[0]: counters 0-7, keep[1]: 8-15).
    const __m512i words[4] = {c0, c1, c2, c3};
    uint64_t keep[2] = {0, 0};
    uint64_t tie[2] = {0, 0};
    for (int q = 0; q < 4; ++q) {
      const uint32_t lt = _mm512_cmplt_epu16_mask(words[q], thr);
      const uint32_t eq = _mm512_cmpeq_epi16_mask(words[q], thr);
      const uint64_t at = 0x0303030303030303ull << (2 * q);
      keep[0] |= _pdep_u64(lt & 0xFFFFu, at);
      keep[1] |= _pdep_u64(lt >> 16, at);
      tie[0] |= _pdep_u64(eq & 0xFFFFu, at);
      tie[1] |= _pdep_u64(eq >> 16, at);
    }
    for (int half = 0; half < 2; ++half) {
      for (uint64_t t = tie[half]; t != 0; t &= t - 1) {
        const int b = __builtin_ctzll(t);
        const auto eb = static_cast<uint64_t>(e + 64 * half + b);
        if (dropout_ties(k, eb, 1u) != 0) keep[half] |= uint64_t{1} << b;
      }
    }
    A* f = fac + (e - e0);
    if constexpr (std::is_same_v<A, float>) {
      const __m512 sv = _mm512_set1_ps(scale);
      for (int c = 0; c < 8; ++c) {
        const auto m = static_cast<__mmask16>(keep[c / 4] >> (16 * (c % 4)));
        _mm512_storeu_ps(f + 16 * c, _mm512_maskz_mov_ps(m, sv));
      }
    } else {
      const __m512d sv = _mm512_set1_pd(scale);
      for (int c = 0; c < 16; ++c) {
        const auto m = static_cast<__mmask8>(keep[c / 8] >> (8 * (c % 8)));
        _mm512_storeu_pd(f + 8 * c, _mm512_maskz_mov_pd(m, sv));
      }
    }
  }
  dropout_factors(k, scale, e, end - e, fac + (e - e0));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi16(static_cast<int16_t>(0x8000));
  // The signed compare of sign-flipped halves is unsigned.
  const __m256i thr = _mm256_set1_epi16(static_cast<int16_t>(thr_hi ^ 0x8000u));
  const __m256i sa = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i sb = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  auto mulhilo = [](__m256i a, __m256i x, __m256i& hi) {
    const __m256i even = _mm256_mul_epu32(a, x);
    const __m256i odd = _mm256_mul_epu32(a, _mm256_srli_epi64(x, 32));
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    return _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  };
  auto word = [](uint64_t v) { return _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(v))); };
  for (; e + 8 * kDropoutGroup <= end; e += 8 * kDropoutGroup) {
    const uint64_t g = static_cast<uint64_t>(e) / kDropoutGroup;
    __m256i c0 = word(k.offset);
    __m256i c1 = word(k.offset >> 32);
    __m256i c2 = _mm256_add_epi32(word(g), lane);
    __m256i c3 = word(g >> 32);
    if (static_cast<uint32_t>(g) > 0xFFFFFFF8u) {  // the low word wraps inside the 8 groups
      alignas(32) uint32_t hi_words[8];
      for (int i = 0; i < 8; ++i) hi_words[i] = static_cast<uint32_t>((g + i) >> 32);
      c3 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_words));
    }
    __m256i k0 = word(k.seed);
    __m256i k1 = word(k.seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round > 0) {
        k0 = _mm256_add_epi32(k0, word(0x9E3779B9u));
        k1 = _mm256_add_epi32(k1, word(0xBB67AE85u));
      }
      __m256i hi0, hi1;
      const __m256i lo0 = mulhilo(sa, c0, hi0);
      const __m256i lo1 = mulhilo(sb, c2, hi1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
      c3 = lo0;
    }
    // Element 8 i + 2 q + s is half s of word q of counter i: 16-bit lane 2 i + s of keep[q].
    alignas(32) int16_t keep[4][16];
    const __m256i words[4] = {c0, c1, c2, c3};
    __m256i any_tie = _mm256_setzero_si256();
    for (int q = 0; q < 4; ++q) {
      const __m256i w = _mm256_xor_si256(words[q], sign);
      _mm256_store_si256(reinterpret_cast<__m256i*>(keep[q]), _mm256_cmpgt_epi16(thr, w));
      any_tie = _mm256_or_si256(any_tie, _mm256_cmpeq_epi16(thr, w));
    }
    A* f = fac + (e - e0);
    for (int i = 0; i < 8; ++i) {
      for (int j = 0; j < 8; ++j) f[8 * i + j] = keep[j >> 1][2 * i + (j & 1)] ? scale : A(0);
    }
    if (!_mm256_testz_si256(any_tie, any_tie)) {  // once in 2^16 elements: redo these 64
      dropout_factors(k, scale, e, 8 * kDropoutGroup, f);
    }
  }
  dropout_factors(k, scale, e, end - e, fac + (e - e0));
#else
  dropout_factors(k, scale, e0, n, fac);
#endif
}

// The dropout key of a forward or backward call (the seed tensor is on the CPU).
inline DropoutKey fwd_dropout_key(const NormFwdArgs& args) {
  const int64_t* s = args.dropout_seed.const_data_ptr<int64_t>();
  return dropout_key(s[0], s[1], args.dropout_p);
}
inline DropoutKey bwd_dropout_key(const NormBwdArgs& args) {
  const int64_t* s = args.dropout_seed.const_data_ptr<int64_t>();
  return dropout_key(s[0], s[1], args.dropout_p);
}

// A parameter row (weight or bias, [N]) in the compute type A: the tensor's own data when it
// already has that type, else converted once per call; an absent parameter reads as fill
// (weight 1, bias 0).
template <typename A>
class ParamRow {
 public:
  ParamRow(const at::Tensor& t, int64_t N, A fill) {
    if (t.defined() && t.scalar_type() == c10::CppTypeToScalarType<A>::value) {
      ptr_ = t.const_data_ptr<A>();
      return;
    }
    buf_.reset(new A[N]);
    if (!t.defined()) {
      std::fill_n(buf_.get(), N, fill);
    } else {
      switch (t.scalar_type()) {
        case at::kFloat: convert(t.const_data_ptr<float>(), N); break;
        case at::kDouble: convert(t.const_data_ptr<double>(), N); break;
        case at::kBFloat16: convert(t.const_data_ptr<c10::BFloat16>(), N); break;
        case at::kHalf: convert(t.const_data_ptr<c10::Half>(), N); break;
        default: TORCH_CHECK(false, "addnorm: unsupported parameter dtype ", t.scalar_type());
      }
    }
    ptr_ = buf_.get();
  }
  const A* get() const { return ptr_; }

 private:
  template <typename P>
  void convert(const P* p, int64_t N) {
    for (int64_t j = 0; j < N; ++j) buf_[j] = static_cast<A>(static_cast<acc_t<P>>(p[j]));
  }
  std::unique_ptr<A[]> buf_;
  const A* ptr_ = nullptr;
};

// 1 / gamma in A (gamma in double), for the backward from the output; a zero in gamma
// leaves the normalized values unrecoverable, and so does one whose reciprocal overflows A
// (|gamma| below 1 / A's largest value): autograd keeps h for such a weight.
template <typename A>
std::unique_ptr<A[]> inverse_weight(const double* gamma, int64_t N) {
  std::unique_ptr<A[]> inv(new A[N]);
  for (int64_t j = 0; j < N; ++j) {
    inv[j] = static_cast<A>(1.0 / gamma[j]);
    TORCH_CHECK(!std::isinf(inv[j]), "addnorm: the backward from the output "
                "(from_output=True) needs a weight without zeros or values whose reciprocal "
                "overflows; weight[", j, "] = ", gamma[j]);
  }
  return inv;
}

template <typename T, typename R, typename H>
void norm_fwd_typed(const NormFwdArgs& args) {
  using A = float;
  using V = VF;
  constexpr int64_t W = Pack<T>::kWidth;
  static_assert(Pack<R>::kWidth == W && Pack<H>::kWidth == W, "mixed widths");
  static_assert(std::is_same_v<acc_t<T>, float>, "float compute type");

  const int64_t M = args.M;
  const int64_t N = args.N;
  const T* x_base = args.x.const_data_ptr<T>();
  const R* r_base = args.residual.defined() ? args.residual.const_data_ptr<R>() : nullptr;
  H* h_base = args.residual_out.defined() ? args.residual_out.mutable_data_ptr<H>() : nullptr;
  T* y_base = args.out.mutable_data_ptr<T>();
  A* mean_base = args.mean.defined() ? args.mean.mutable_data_ptr<A>() : nullptr;
  A* rstd_base = args.rstd.mutable_data_ptr<A>();
  const ParamRow<A> gamma_row(args.gamma, N, A(1));
  const ParamRow<A> beta_row(args.beta, N, A(0));
  const A* gamma = gamma_row.get();
  const A* beta = beta_row.get();
  // float32 output is computed in double lanes (pass 2), with the parameters widened once.
  constexpr bool kFloatOut = std::is_same_v<T, float>;
  const ParamRow<double> gamma_d(kFloatOut ? args.gamma : at::Tensor(), kFloatOut ? N : 0, 1.0);
  const ParamRow<double> beta_d(kFloatOut ? args.beta : at::Tensor(), kFloatOut ? N : 0, 0.0);
  const bool rms = args.rms;
  const double eps = args.eps;
  const int64_t grain = std::max<int64_t>(1, 16384 / N);

  const bool drop = args.dropout_p > 0.0;
  const DropoutKey drop_key = drop ? fwd_dropout_key(args) : DropoutKey{};
  const A drop_scale = dropout_scale<A>(args.dropout_p);
  // float32 rows without a residual or dropout are normalized in place: no scratch row.
  const bool needs_scratch = r_base != nullptr || !std::is_same_v<T, A> || drop;

  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<A[]> scratch(needs_scratch ? new A[N] : nullptr);
    std::unique_ptr<A[]> fac(drop ? new A[N] : nullptr);
    for (int64_t i = begin; i < end; ++i) {
      const T* x = x_base + i * N;
      H* h = h_base ? h_base + i * N : nullptr;
      const A* v = scratch.get();  // the row being normalized, in float

      // Pass 1: v = h = dropout(x) (+ residual), rounded to H (written to residual_out if
      // asked), and its moments: the sums of d = v - shift and of d * d, shift the row's
      // first v (RMSNorm: of v * v). The dropped x is x * factor in float (not rounded to T
      // first).
      A* sv = scratch.get();
      double shift = 0.0;
      DD s, q;
      auto moments = [&](const auto& fv, const auto& fs) {
        if (rms) {
          blocked_moments<true>(N, 0.0, fv, fs, s, q);
        } else {
          shift = static_cast<double>(fs(0));  // (the sweep stores element 0 again, alike)
          blocked_moments<false>(N, shift, fv, fs, s, q);
        }
      };
      if (drop || r_base) {
        // h = x * factor (dropout) + r (residual); either may be absent.
        const R* r = r_base ? r_base + i * N : nullptr;
        const A* f = fac.get();
        if (drop) dropout_factors_fast(drop_key, drop_scale, i * N, N, fac.get());
        auto fv = [&](int64_t j, V& a0, V& a1) {
          Pack<T>::load(x + j, a0, a1);
          if (f) {
            a0 = a0 * V::loadu(f + j);
            a1 = a1 * V::loadu(f + j + V::size());
          }
          if (r) {
            V b0, b1;
            Pack<R>::load(r + j, b0, b1);
            a0 = a0 + b0;
            a1 = a1 + b1;
          }
          Pack<H>::round_store(h ? h + j : nullptr, a0, a1);
          a0.store(sv + j);
          a1.store(sv + j + V::size());
        };
        auto fs = [&](int64_t j) {
          A t = f ? to_acc<A>(x[j]) * f[j] : to_acc<A>(x[j]);
          if (r) t += to_acc<A>(r[j]);
          const H hv = static_cast<H>(t);
          if (h) h[j] = hv;
          return sv[j] = to_acc<A>(hv);
        };
        moments(fv, fs);
      } else {
        if (h) {
          if constexpr (std::is_same_v<H, T>) {
            std::copy(x, x + N, h);
          } else {
            for (int64_t j = 0; j < N; ++j) h[j] = static_cast<H>(to_acc<A>(x[j]));
          }
        }
        if constexpr (std::is_same_v<T, A>) {
          v = x;
          auto fv = [&](int64_t j, V& a0, V& a1) {
            a0 = V::loadu(x + j);
            a1 = V::loadu(x + j + V::size());
          };
          auto fs = [&](int64_t j) { return x[j]; };
          moments(fv, fs);
        } else {
          auto fv = [&](int64_t j, V& a0, V& a1) {
            Pack<T>::load(x + j, a0, a1);
            a0.store(sv + j);
            a1.store(sv + j + V::size());
          };
          auto fs = [&](int64_t j) { return sv[j] = to_acc<A>(x[j]); };
          moments(fv, fs);
        }
      }

      // The statistics (row_moments: from a second, two-pass sweep over v for the rows
      // whose one-sweep variance could lose bits).
      double mean, var;
      row_moments(rms, s, q, shift, v, N, mean, var);
      const double rstd = 1.0 / std::sqrt(var + eps);
      const A mean_a = static_cast<A>(mean);
      const A rstd_a = static_cast<A>(rstd);
      if (mean_base) mean_base[i] = mean_a;
      rstd_base[i] = rstd_a;

      // Pass 2: out = (v - mean) * rstd * gamma + beta. float32 output: in double lanes,
      // rounded once (a float-lane result is within about an ulp, torch's is too, and
      // either can be the larger). float16/bfloat16 output: in float lanes where the split
      // statistics are exact and h - mean cannot overflow (|h - mean| <= sqrt(N * var)),
      // else (and for NaN statistics, and without fused multiply-add) in double lanes.
      T* y = y_base + i * N;
      const bool float_lanes = !std::is_same_v<T, float> && kFusedFma && rstd >= 0x1p-100 &&
                               rstd <= 0x1p100 && var * static_cast<double>(N) <= 0x1p250;
      int64_t j = 0;
      if (float_lanes) {
        // mean and rstd as float plus their rounding error (see normalized).
        const A mean_lo = static_cast<A>(mean - static_cast<double>(mean_a));
        const A rstd_lo = static_cast<A>(rstd - static_cast<double>(rstd_a));
        const V mean_v(mean_a), rstd_v(rstd_a), mean_lo_v(mean_lo), rstd_lo_v(rstd_lo);
        for (; j + W <= N; j += W) {
          const V o0 = at::vec::fmadd(
              normalized(V::loadu(v + j), mean_v, mean_lo_v, rstd_v, rstd_lo_v),
              V::loadu(gamma + j), V::loadu(beta + j));
          const V o1 = at::vec::fmadd(
              normalized(V::loadu(v + j + V::size()), mean_v, mean_lo_v, rstd_v, rstd_lo_v),
              V::loadu(gamma + j + V::size()), V::loadu(beta + j + V::size()));
          Pack<T>::store(y + j, o0, o1);
        }
        for (; j < N; ++j) {
          y[j] = static_cast<T>(
              fma_of(normalized(v[j], mean_a, mean_lo, rstd_a, rstd_lo), gamma[j], beta[j]));
        }
      } else if constexpr (std::is_same_v<T, float>) {
        // float32 data: v widened as loaded, gamma and beta already in double.
        const VD mean_v(mean), rstd_v(rstd);
        const double* gd = gamma_d.get();
        const double* bd = beta_d.get();
        for (; j + W <= N; j += W) {
          VD o[4];
          for (int k = 0; k < 2; ++k) {
            const int64_t jk = j + k * V::size();
            VD lo, hi;
            widen_load(v + jk, lo, hi);
            o[2 * k] = fma_of((lo - mean_v) * rstd_v, VD::loadu(gd + jk), VD::loadu(bd + jk));
            o[2 * k + 1] = fma_of((hi - mean_v) * rstd_v, VD::loadu(gd + jk + VD::size()),
                                  VD::loadu(bd + jk + VD::size()));
          }
          Pack<T>::store(y + j, narrow(o[0], o[1]), narrow(o[2], o[3]));
        }
        for (; j < N; ++j) {
          y[j] = static_cast<float>(fma_of((static_cast<double>(v[j]) - mean) * rstd, gd[j], bd[j]));
        }
      } else {
        const VD mean_v(mean), rstd_v(rstd);
        for (; j + W <= N; j += W) {
          Pack<T>::store(
              y + j,
              normalized_wide(V::loadu(v + j), V::loadu(gamma + j), V::loadu(beta + j),
                              mean_v, rstd_v),
              normalized_wide(V::loadu(v + j + V::size()), V::loadu(gamma + j + V::size()),
                              V::loadu(beta + j + V::size()), mean_v, rstd_v));
        }
        for (; j < N; ++j) {
          y[j] = static_cast<T>(static_cast<float>(
              fma_of((static_cast<double>(v[j]) - mean) * rstd, static_cast<double>(gamma[j]),
                     static_cast<double>(beta[j]))));
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Forward, float64: statistics as double-doubles (f64_stats), out to about one rounding.

// ((v * scale - mean) * rstd) * gamma + beta, with mean and rstd double-doubles (S =
// double or VD): h - mean is kept exactly (TwoSum), its product with rstd as a
// double-double (TwoProd), and the affine step rounds once.
template <typename S>
inline S f64_normalized(const S& v, const S& neg_mean_hi, const S& mean_lo, const S& rstd_hi,
                        const S& rstd_lo, const S& gamma, const S& beta) {
  S dh, dl;
  two_sum(v, neg_mean_hi, dh, dl);
  dl = dl - mean_lo;
  S p, pe;
  two_prod(dh, rstd_hi, p, pe);
  const S y_lo = pe + fma_of(dh, rstd_lo, dl * rstd_hi);  // xhat = p + y_lo
  S q, qe;
  two_prod(p, gamma, q, qe);
  S s, se;
  two_sum(q, beta, s, se);
  const S out = s + fma_of(y_lo, gamma, se + qe);
  if constexpr (std::is_floating_point_v<S>) {
    return std::isinf(s) ? s : out;
  } else {
    return S::blendv(out, s, s.abs() == S(std::numeric_limits<double>::infinity()));
  }
}

void norm_fwd_f64(const NormFwdArgs& args) {
  using V = VD;
  constexpr int64_t W = 2 * V::size();
  const int64_t M = args.M;
  const int64_t N = args.N;
  const double* x_base = args.x.const_data_ptr<double>();
  const double* r_base = args.residual.defined() ? args.residual.const_data_ptr<double>() : nullptr;
  double* h_base = args.residual_out.defined() ? args.residual_out.mutable_data_ptr<double>() : nullptr;
  double* y_base = args.out.mutable_data_ptr<double>();
  double* mean_base = args.mean.defined() ? args.mean.mutable_data_ptr<double>() : nullptr;
  double* rstd_base = args.rstd.mutable_data_ptr<double>();
  const ParamRow<double> gamma_row(args.gamma, N, 1.0);
  const ParamRow<double> beta_row(args.beta, N, 0.0);
  const double* gamma = gamma_row.get();
  const double* beta = beta_row.get();
  const bool rms = args.rms;
  const double eps = args.eps;
  const int64_t grain = std::max<int64_t>(1, 16384 / N);

  const bool drop = args.dropout_p > 0.0;
  const DropoutKey drop_key = drop ? fwd_dropout_key(args) : DropoutKey{};
  const double drop_scale = dropout_scale<double>(args.dropout_p);

  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<double[]> scratch(r_base || drop ? new double[N] : nullptr);
    std::unique_ptr<double[]> fac(drop ? new double[N] : nullptr);
    for (int64_t i = begin; i < end; ++i) {
      const double* x = x_base + i * N;
      double* h = h_base ? h_base + i * N : nullptr;

      // Pass 1: v = h = dropout(x) (+ residual) (written to residual_out if asked) and its
      // sum.
      const double* v = x;
      DD sum;
      if (drop || r_base) {
        // h = x * factor (dropout) + r (residual); either may be absent.
        const double* r = r_base ? r_base + i * N : nullptr;
        const double* f = fac.get();
        if (drop) dropout_factors_fast(drop_key, drop_scale, i * N, N, fac.get());
        double* sv = scratch.get();
        v = sv;
        sum = blocked_sum(
            N,
            [&](int64_t j, V& a0, V& a1) {
              a0 = V::loadu(x + j);
              a1 = V::loadu(x + j + V::size());
              if (f) {
                a0 = a0 * V::loadu(f + j);
                a1 = a1 * V::loadu(f + j + V::size());
              }
              if (r) {
                a0 = a0 + V::loadu(r + j);
                a1 = a1 + V::loadu(r + j + V::size());
              }
              a0.store(sv + j);
              a1.store(sv + j + V::size());
            },
            [&](int64_t j) {
              const double t = f ? x[j] * f[j] : x[j];
              return sv[j] = r ? t + r[j] : t;
            });
        if (h) std::copy(sv, sv + N, h);
      } else {
        if (h) std::copy(x, x + N, h);
        if (!rms) {
          sum = blocked_sum(
              N,
              [&](int64_t j, V& a0, V& a1) {
                a0 = V::loadu(x + j);
                a1 = V::loadu(x + j + V::size());
              },
              [&](int64_t j) { return x[j]; });
        }
      }

      // Pass 2: statistics (double-double, rescaled where the plain sums fail).
      const F64Stats st = f64_stats(v, N, eps, rms, sum);
      if (mean_base) mean_base[i] = (st.mean_hi + st.mean_lo) / st.scale;
      rstd_base[i] = (st.rstd_hi + st.rstd_lo) * st.scale;

      // Pass 3: out = (v - mean) * rstd * gamma + beta, at the statistics' scale.
      double* y = y_base + i * N;
      const V scale_v(st.scale), neg_mean_v(-st.mean_hi), mean_lo_v(st.mean_lo),
          rstd_v(st.rstd_hi), rstd_lo_v(st.rstd_lo);
      int64_t j = 0;
      for (; j + W <= N; j += W) {
        f64_normalized(V::loadu(v + j) * scale_v, neg_mean_v, mean_lo_v, rstd_v, rstd_lo_v,
                       V::loadu(gamma + j), V::loadu(beta + j))
            .store(y + j);
        f64_normalized(V::loadu(v + j + V::size()) * scale_v, neg_mean_v, mean_lo_v, rstd_v,
                       rstd_lo_v, V::loadu(gamma + j + V::size()),
                       V::loadu(beta + j + V::size()))
            .store(y + j + V::size());
      }
      for (; j < N; ++j) {
        y[j] = f64_normalized(v[j] * st.scale, -st.mean_hi, st.mean_lo, st.rstd_hi, st.rstd_lo,
                              gamma[j], beta[j]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward
//   grad_out: [M, N] G;  h, grad_h, grad_residual_out: [M, N] X;  mean, rstd: [M]
//   gamma: [N] compute type;  partials: see norm_kernel.h
//
//   xhat = (h - mean) * rstd,  g = dy * gamma
//   dh = rstd * (g - mean(g) - xhat * mean(g * xhat))      (RMSNorm: no mean(g) term)
//
// The row sums and grad_h use the same g, the exact product (float data: in double;
// float64: as a double-double), so a one-element row's LayerNorm passes exactly no gradient
// to h, and float64's grad_h is rounded once from a double-double (an error of g rounded to
// double carried through the bracket's cancellation cost up to an ulp).
//
// Pass 1 reads dy and h, takes d = h - shift (shift: the saved mean; RMSNorm 0) and sums g
// and g * d, and, given the forward's eps, d and d * d (float64: only then): then mean =
// shift + sum(d) / N and var = sum(d^2) / N - (sum(d) / N)^2 are the statistics
// of h itself, to double precision (the forward normalized with those; the saved float32
// ones would carry their rounding error into every gradient), and sum(g * xhat) = rstd *
// (sum(g * d) - (mean - shift) * sum(g)). Without eps, mean and rstd are the saved ones.
// Pass 2 writes grad_h and adds dy * xhat to the chunk's dgamma partial (dy to its dbeta
// partial: float data in pass 1, float64 in pass 2); float data takes d again from h, whose
// row is still in cache, rather than keeping a double row of it. Rows are processed in the
// chunks of bwd_chunk_rows, each chunk by one thread. Every element of h (or y) and of dy is
// read before grad_h and grad_input are written at its place, and never after: those may
// be written over h or dy (launch_norm_bwd's over_inputs, ops/norm_launch.h).
//
// From the output (memory_efficient): the passes read y instead of h and take d = xhat =
// (y - beta) * (1 / gamma) in float lanes, widened (float64: a scratch row of (y - beta) /
// gamma, divided), and run as on h with shift 0, xhat's own scale 1 and the saved rstd
// (which still scales grad_h); float data does not sum d and d * d there.
//
// With the forward's fused dropout, pass 2 also writes grad_input = grad_h (rounded to
// grad_h's dtype) times the row's dropout factors (mask / (1 - p)), rounded to grad_out's
// dtype: bitwise what _dropout_apply of grad_h gives, without reading grad_h back (grad_h
// itself is written only when wanted).
//
// The parameters' gradients alone (neither grad_h nor grad_input wanted; float data,
// bwd_row_params): pass 1 sums dy, and d and d * d from h (used where eps is given), not g
// and g * d; pass 2 only adds dy * xhat to the dgamma partial. float64 runs its full passes
// and skips the stores.

// The float-data backward's arguments, passed by value into the row loops (locals the
// compiler keeps in registers: vector stores may alias any memory).
template <typename G, typename X>
struct FloatBwdArgs {
  const G* dy;
  const X* dres;  // nullptr when absent
  const X* h;     // nullptr from the output
  const G* y;     // from the output: y; else nullptr
  const float* beta;       // from the output: beta (0 when absent)
  const float* inv_gamma;  // from the output: 1 / gamma
  G* dxin;                 // fused dropout: grad of the input; else nullptr
  DropoutKey key;          // fused dropout's key and scale
  float drop_scale;
  const float* mean;  // nullptr for RMSNorm
  const float* rstd;
  const double* gamma;  // in double
  X* dx;                // nullptr when grad_h is not wanted
  double* partials;  // [chunks, 2, N]; nullptr when not wanted
  int64_t M;
  int64_t N;
  int64_t rows_per_chunk;
  bool own_stats;
  double eps;
};

// Lanes of pass 1's sums over a block: g, g * d, d, d * d (RMSNorm: only g * d and d * d;
// without kStats, from the output, whose statistics are the saved ones: no d, d * d;
// without kGrad, for the parameters' gradients alone: no g, g * d). add: one float
// vector's worth of elements: dy and d as two double vectors each, gamma at gm; dy to the
// chunk's dbeta partial (pb).
template <bool kRms, bool kPartials, bool kStats, bool kGrad>
struct BwdSums {
  VD g0{0.0}, g1{0.0}, gd0{0.0}, gd1{0.0}, d0{0.0}, d1{0.0}, dd0{0.0}, dd1{0.0};
  void add(const VD& y0, const VD& y1, const VD& x0, const VD& x1, const double* gm,
           double* pb) {
    constexpr int64_t S = VD::size();
    if constexpr (kGrad) {
      const VD e0 = y0 * VD::loadu(gm);
      const VD e1 = y1 * VD::loadu(gm + S);
      gd0 = fma_of(e0, x0, gd0);
      gd1 = fma_of(e1, x1, gd1);
      if constexpr (!kRms) {
        g0 = g0 + e0;
        g1 = g1 + e1;
      }
    }
    if constexpr (kStats) {
      dd0 = fma_of(x0, x0, dd0);
      dd1 = fma_of(x1, x1, dd1);
    }
    if constexpr (!kRms && kStats) {
      d0 = d0 + x0;
      d1 = d1 + x1;
    }
    if constexpr (kPartials) {
      (VD::loadu(pb) + y0).store(pb);
      (VD::loadu(pb + S) + y1).store(pb + S);
    }
  }
};

// d of a row's elements, computed the same way by both passes (so that no scratch row
// carries it from pass 1 to pass 2): from h, d = h - shift in double; from the output y
// (S = G), d = xhat = (y - beta) * inv_gamma in float lanes, widened.
template <typename S, bool kFromOutput>
struct RowD {
  const S* src;
  double shift;
  const float* beta;
  const float* inv_gamma;
  // Elements [jk, jk + VF::size()), half k of the Pack sp loaded at jk - k * VF::size().
  void half(const WidePack<S>& sp, int k, int64_t jk, VD& d0, VD& d1) const {
    if constexpr (kFromOutput) {
      VF v;
      if constexpr (std::is_same_v<S, float>) {
        v = VF::loadu(src + jk);
      } else {
        v = k == 0 ? sp.a : sp.b;
      }
      widen((v - VF::loadu(beta + jk)) * VF::loadu(inv_gamma + jk), d0, d1);
    } else {
      sp.half(k, d0, d1);
      d0 = d0 - VD(shift);
      d1 = d1 - VD(shift);
    }
  }
  double at(int64_t j) const {
    if constexpr (kFromOutput) {
      return static_cast<double>((to_acc<float>(src[j]) - beta[j]) * inv_gamma[j]);
    } else {
      return static_cast<double>(to_acc<float>(src[j])) - shift;
    }
  }
};

// A row's constants in pass 2: xhat = d * xs + x_off (xs = rstd, x_off = -(mean - shift) *
// rstd; from the output xs = 1, x_off = 0), grad_h = (g - c1) * rstd + xhat * b (b = -rstd *
// c2).
struct BwdRow {
  VD rstd, xs, x_off, c1, b;
};

// Pass 2 for one float vector's worth of elements: grad_h in double, rounded once; with pg,
// the chunk's dgamma partial. y: dy, r: the grad of h, as double vectors.
template <bool kResidual, bool kPartials>
inline VF bwd_out(const VD& d0, const VD& d1, const double* gm, const VD& y0, const VD& y1,
                  const VD& r0, const VD& r1, const BwdRow& row, double* pg) {
  constexpr int64_t S = VD::size();
  const VD x0 = fma_of(d0, row.xs, row.x_off);
  const VD x1 = fma_of(d1, row.xs, row.x_off);
  // (as the scalar tail: x * b + r fused)
  const VD t0 = kResidual ? fma_of(x0, row.b, r0) : x0 * row.b;
  const VD t1 = kResidual ? fma_of(x1, row.b, r1) : x1 * row.b;
  const VD o0 = fma_of(y0 * VD::loadu(gm) - row.c1, row.rstd, t0);
  const VD o1 = fma_of(y1 * VD::loadu(gm + S) - row.c1, row.rstd, t1);
  if constexpr (kPartials) {
    fma_of(y0, x0, VD::loadu(pg)).store(pg);
    fma_of(y1, x1, VD::loadu(pg + S)).store(pg + S);
  }
  return narrow(o0, o1);
}

// Pass 2 over a row.
template <typename G, typename X, typename S, bool kResidual, bool kPartials, bool kFromOutput>
void bwd_row_out(const G* dy, const X* dres, X* dx, const RowD<S, kFromOutput> rd,
                 const double* gm, int64_t N, const BwdRow row, double rstd, double xs,
                 double x_off, double c1, double b, double* pg, G* dxin, const float* fac,
                 const NextRow next) {
  using V = VF;
  constexpr int64_t W = Pack<X>::kWidth;
  static_assert(Pack<S>::kWidth == W, "mixed widths");
  static_assert(W * sizeof(G) <= NextRow::kStepBytes && W * sizeof(X) <= NextRow::kStepBytes,
                "one fetch per step");
  int64_t j = 0;
  for (; j + W <= N; j += W) {
    next.fetch(j);
    const WidePack<G> dyp(dy + j);
    const WidePack<S> sp(rd.src + j);
    V o[2];
    if constexpr (kResidual) {
      const WidePack<X> rp(dres + j);
      for (int k = 0; k < 2; ++k) {
        const int64_t jk = j + k * V::size();
        VD y0, y1, d0, d1, r0, r1;
        dyp.half(k, y0, y1);
        rd.half(sp, k, jk, d0, d1);
        rp.half(k, r0, r1);
        o[k] = bwd_out<true, kPartials>(d0, d1, gm + jk, y0, y1, r0, r1, row,
                                        kPartials ? pg + jk : nullptr);
      }
    } else {
      for (int k = 0; k < 2; ++k) {
        const int64_t jk = j + k * V::size();
        VD y0, y1, d0, d1;
        dyp.half(k, y0, y1);
        rd.half(sp, k, jk, d0, d1);
        o[k] = bwd_out<false, kPartials>(d0, d1, gm + jk, y0, y1, y0, y1, row,
                                         kPartials ? pg + jk : nullptr);
      }
    }
    if (dxin) {
      Pack<X>::round_store(dx ? dx + j : nullptr, o[0], o[1]);
      Pack<G>::store(dxin + j, o[0] * VF::loadu(fac + j), o[1] * VF::loadu(fac + j + V::size()));
    } else if (dx) {
      Pack<X>::store(dx + j, o[0], o[1]);
    }
  }
  for (; j < N; ++j) {
    const double xh = fma_of(rd.at(j), xs, x_off);
    const double r = kResidual ? static_cast<double>(to_acc<float>(dres[j])) : 0.0;
    const double y = static_cast<double>(to_acc<float>(dy[j]));
    const double g = y * gm[j];
    const X v = static_cast<X>(static_cast<float>(fma_of(g - c1, rstd, fma_of(xh, b, r))));
    if (dx) dx[j] = v;
    if (dxin) dxin[j] = static_cast<G>(static_cast<float>(v) * fac[j]);
    if constexpr (kPartials) {
      pg[j] = fma_of(y, xh, pg[j]);
    }
  }
}

// f(jk, y0, y1, d0, d1) for each float vector's worth of elements [jk, jk + VF::size()) in
// the whole Packs from j up to end: dy and d as two double vectors each (next: the next
// row's prefetch, one step at a time). Returns the first element not visited. (Always
// inlined, as bwd_sums: the callers' accumulators then stay in registers.)
template <typename G, typename S, bool kFromOutput, typename F>
__attribute__((always_inline)) inline int64_t for_each_half(
    const G* dy, const RowD<S, kFromOutput>& rd, int64_t j, int64_t end, const NextRow& next,
    const F& f) {
  constexpr int64_t W = Pack<S>::kWidth;
  static_assert(Pack<G>::kWidth == W, "mixed widths");
  for (; j + W <= end; j += W) {
    next.fetch(j);
    const WidePack<G> dyp(dy + j);
    const WidePack<S> sp(rd.src + j);
    for (int k = 0; k < 2; ++k) {
      const int64_t jk = j + k * VF::size();
      VD y0, y1, d0, d1;
      dyp.half(k, y0, y1);
      rd.half(sp, k, jk, d0, d1);
      f(jk, y0, y1, d0, d1);
    }
  }
  return j;
}

// Pass 1 over a row (see BwdSums): sum[0..3] += the sums of g, g * d, d, d * d (without
// kGrad, g and g * d stay 0).
template <typename G, typename S, bool kRms, bool kPartials, bool kFromOutput, bool kGrad = true>
__attribute__((always_inline)) inline void bwd_sums(
    const G* dy, const RowD<S, kFromOutput> rd, const double* gm, int64_t N, double* pb,
    DD (&sum)[4]) {
  for (int64_t b0 = 0; b0 < N; b0 += kBlock) {
    const int64_t b1 = std::min(N, b0 + kBlock);
    BwdSums<kRms, kPartials, !kFromOutput, kGrad> s;
    int64_t j = for_each_half(
        dy, rd, b0, b1, NextRow(),
        [&](int64_t jk, const VD& y0, const VD& y1, const VD& x0, const VD& x1) {
          s.add(y0, y1, x0, x1, gm + jk, kPartials ? pb + jk : nullptr);
        });
    double t[4] = {0.0, 0.0, 0.0, 0.0};
    for (; j < b1; ++j) {
      const double y = static_cast<double>(to_acc<float>(dy[j]));
      const double g = y * gm[j];
      const double d = rd.at(j);
      if constexpr (kGrad) t[1] = fma_of(g, d, t[1]);
      t[3] = fma_of(d, d, t[3]);
      if constexpr (!kRms) {  // (as BwdSums: RMSNorm leaves the sums of g and d at 0)
        if constexpr (kGrad) t[0] += g;
        t[2] += d;
      }
      if constexpr (kPartials) pb[j] += y;
    }
    sum[0].add(reduce_add(s.g0 + s.g1));
    sum[1].add(reduce_add(s.gd0 + s.gd1));
    sum[2].add(reduce_add(s.d0 + s.d1));
    sum[3].add(reduce_add(s.dd0 + s.dd1));
    for (int k = 0; k < 4; ++k) sum[k].add(t[k]);
  }
}

// mean = shift + delta and rstd of row i: from pass 1's sums of d and d * d where the
// forward's eps is given (own), else the saved ones (delta 0).
inline void row_stats(bool own, bool rms, const DD (&sum)[4], double nd, double eps,
                      float saved_rstd, double& delta, double& rstd) {
  delta = 0.0;
  rstd = static_cast<double>(saved_rstd);
  if (own) {
    delta = rms ? 0.0 : sum[2].value() / nd;
    const double var = std::max(sum[3].value() / nd - delta * delta, 0.0);
    rstd = 1.0 / std::sqrt(var + eps);
  }
}

// Row i's dgamma and dbeta partials alone (neither grad_h nor the input's gradient wanted;
// pg and pb are set together): pass 1 sums dy and, from h, d and d * d (the statistics of h
// that xhat needs where eps is given), not g and g * d; pass 2 adds dy * xhat to pg and
// computes no grad_h. The partials are bitwise those of bwd_row's passes.
template <typename G, typename X, bool kRms, typename S, bool kFromOutput>
void bwd_row_params(const FloatBwdArgs<G, X> a, int64_t i, const RowD<S, kFromOutput> rd,
                    double* pg, double* pb, const NextRow next) {
  if (pg == nullptr) return;
  const int64_t N = a.N;
  const G* dy = a.dy + i * N;
  const bool own = a.own_stats && !kFromOutput;
  DD sum[4];
  bwd_sums<G, S, kRms, true, kFromOutput, false>(dy, rd, a.gamma, N, pb, sum);
  double delta, rstd;
  row_stats(own, kRms, sum, static_cast<double>(N), a.eps, a.rstd[i], delta, rstd);
  const double xs = kFromOutput ? 1.0 : rstd;
  const double x_off = -delta * xs;
  const VD vxs(xs), vx_off(x_off);
  constexpr int64_t D = VD::size();
  int64_t j = for_each_half(
      dy, rd, 0, N, next, [&](int64_t jk, const VD& y0, const VD& y1, const VD& d0, const VD& d1) {
        fma_of(y0, fma_of(d0, vxs, vx_off), VD::loadu(pg + jk)).store(pg + jk);
        fma_of(y1, fma_of(d1, vxs, vx_off), VD::loadu(pg + jk + D)).store(pg + jk + D);
      });
  for (; j < N; ++j) {
    const double y = static_cast<double>(to_acc<float>(dy[j]));
    pg[j] = fma_of(y, fma_of(rd.at(j), xs, x_off), pg[j]);
  }
}

// Row i's two passes (d from rd; pg, pb: the chunk's dgamma and dbeta partials, or null;
// fac: a scratch row for the fused dropout's factors).
template <typename G, typename X, bool kRms, typename S, bool kFromOutput>
void bwd_row(const FloatBwdArgs<G, X> a, int64_t i, const RowD<S, kFromOutput> rd, double* pg,
             double* pb, float* fac, const NextRow next) {
  if (!a.dx && !a.dxin) {
    bwd_row_params<G, X, kRms>(a, i, rd, pg, pb, next);
    return;
  }
  const int64_t N = a.N;
  const double nd = static_cast<double>(N);
  const G* dy = a.dy + i * N;

  // Pass 1: dy to the dbeta partial; the sums of g, g * d, d, d * d.
  DD sum[4];  // g, g * d, d, d * d
  if (pb) {
    bwd_sums<G, S, kRms, true>(dy, rd, a.gamma, N, pb, sum);
  } else {
    bwd_sums<G, S, kRms, false>(dy, rd, a.gamma, N, pb, sum);
  }
  // mean = shift + delta; rstd (from the output: the saved rstd, xhat's mean 0); xs, the
  // scale from d to xhat; c1 = mean(g), c2 = mean(g * xhat).
  double delta, rstd;
  row_stats(a.own_stats && !kFromOutput, kRms, sum, nd, a.eps, a.rstd[i], delta, rstd);
  const double xs = kFromOutput ? 1.0 : rstd;
  const double c1 = kRms ? 0.0 : sum[0].value() / nd;
  const double c2 = xs * ((sum[1].value() - delta * sum[0].value()) / nd);
  const double x_off = -delta * xs;
  const double b = -rstd * c2;

  // Pass 2: dh = rstd * (g - c1 - xhat * c2) (+ grad of the returned h); dgamma partial.
  const BwdRow row{VD(rstd), VD(xs), VD(x_off), VD(c1), VD(b)};
  const X* dres = a.dres ? a.dres + i * N : nullptr;
  X* dx = a.dx ? a.dx + i * N : nullptr;
  G* dxin = a.dxin ? a.dxin + i * N : nullptr;
  if (dxin) dropout_factors_fast(a.key, a.drop_scale, i * N, N, fac);
  if (dres && pg) {
    bwd_row_out<G, X, S, true, true>(dy, dres, dx, rd, a.gamma, N, row, rstd, xs, x_off, c1, b,
                                     pg, dxin, fac, next);
  } else if (dres) {
    bwd_row_out<G, X, S, true, false>(dy, dres, dx, rd, a.gamma, N, row, rstd, xs, x_off, c1,
                                      b, pg, dxin, fac, next);
  } else if (pg) {
    bwd_row_out<G, X, S, false, true>(dy, dres, dx, rd, a.gamma, N, row, rstd, xs, x_off, c1,
                                      b, pg, dxin, fac, next);
  } else {
    bwd_row_out<G, X, S, false, false>(dy, dres, dx, rd, a.gamma, N, row, rstd, xs, x_off, c1,
                                       b, pg, dxin, fac, next);
  }
}

// The rows of chunk c (fac: a scratch row for the fused dropout's factors).
template <typename G, typename X, bool kRms>
void bwd_chunk(const FloatBwdArgs<G, X> a, int64_t c, float* fac) {
  const int64_t N = a.N;
  double* pg = a.partials ? a.partials + c * 2 * N : nullptr;
  double* pb = pg ? pg + N : nullptr;
  if (pg) {
    std::fill(pg, pg + 2 * N, 0.0);
  }
  const int64_t row_begin = c * a.rows_per_chunk;
  const int64_t row_end = std::min(a.M, row_begin + a.rows_per_chunk);
  for (int64_t i = row_begin; i < row_end; ++i) {
    const bool last = i + 1 == row_end;
    if (a.y != nullptr) {
      const G* y = a.y + i * N;
      const RowD<G, true> rd{y, 0.0, a.beta, a.inv_gamma};
      bwd_row<G, X, kRms>(a, i, rd, pg, pb, fac,
                          last ? NextRow() : NextRow(a.dy + (i + 1) * N, y + N));
    } else {
      const X* h = a.h + i * N;
      const double shift = kRms ? 0.0 : static_cast<double>(a.mean[i]);
      const RowD<X, false> rd{h, shift, nullptr, nullptr};
      bwd_row<G, X, kRms>(a, i, rd, pg, pb, fac,
                          last ? NextRow() : NextRow(a.dy + (i + 1) * N, h + N));
    }
  }
}

template <typename G, typename X>
void norm_bwd_typed(const NormBwdArgs& args, const at::Tensor& partials) {
  static_assert(std::is_same_v<acc_t<X>, float>, "float compute type");
  const int64_t N = args.N;
  const ParamRow<double> gamma(args.gamma, N, 1.0);
  FloatBwdArgs<G, X> a;
  a.dy = args.grad_out.const_data_ptr<G>();
  a.dres = args.grad_residual_out.defined() ? args.grad_residual_out.const_data_ptr<X>() : nullptr;
  std::unique_ptr<float[]> inv_gamma;
  std::optional<ParamRow<float>> beta;
  if (args.from_output) {
    a.h = nullptr;
    a.y = args.h.const_data_ptr<G>();
    inv_gamma = inverse_weight<float>(gamma.get(), N);
    a.inv_gamma = inv_gamma.get();
    beta.emplace(args.beta, N, 0.0f);
    a.beta = beta->get();
  } else {
    a.h = args.h.const_data_ptr<X>();
    a.y = nullptr;
    a.beta = a.inv_gamma = nullptr;
  }
  a.mean = (args.rms || args.from_output) ? nullptr : args.mean.const_data_ptr<float>();
  a.rstd = args.rstd.const_data_ptr<float>();
  a.gamma = gamma.get();
  a.dx = args.grad_h.defined() ? args.grad_h.mutable_data_ptr<X>() : nullptr;
  a.dxin = nullptr;
  if (args.grad_input.defined()) {
    a.dxin = args.grad_input.mutable_data_ptr<G>();
    a.key = bwd_dropout_key(args);
    a.drop_scale = dropout_scale<float>(args.dropout_p);
  }
  a.partials = partials.defined() ? partials.mutable_data_ptr<double>() : nullptr;
  a.M = args.M;
  a.N = N;
  a.rows_per_chunk = bwd_chunk_rows(args.M, N);
  a.own_stats = args.eps.has_value();
  a.eps = args.eps.value_or(0.0);
  const int64_t chunks = bwd_chunks(args.M, N);
  TORCH_CHECK(!partials.defined() || (partials.size(0) == chunks && partials.size(1) == 2),
              "addnorm: backward partials of shape ", partials.sizes(), ", expected [", chunks,
              ", 2, ", N, "]");
  const bool rms = args.rms;
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::unique_ptr<float[]> fac(a.dxin ? new float[a.N] : nullptr);  // dropout factors
    for (int64_t c = c_begin; c < c_end; ++c) {
      if (rms) {
        bwd_chunk<G, X, true>(a, c, fac.get());
      } else {
        bwd_chunk<G, X, false>(a, c, fac.get());
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward, float64: the same passes in double-double (d = h - shift kept exactly, sums,
// statistics, xhat and the dgamma/dbeta partials as double-doubles), grad_h to about one
// rounding. Rows whose sums leave the double range are taken at a power-of-two scale.

// xhat = (h * scale - mean) * rstd as p + e (S = double or VD), mean and rstd double-doubles.
template <typename S>
inline void f64_xhat(const S& h, const S& scale, const S& neg_mean_hi, const S& mean_lo,
                     const S& rstd_hi, const S& rstd_lo, S& p, S& e) {
  S dh, dl;
  two_sum(h * scale, neg_mean_hi, dh, dl);
  dl = dl - mean_lo;
  two_prod(dh, rstd_hi, p, e);
  e = e + fma_of(dh, rstd_lo, dl * rstd_hi);
}

// hi + lo += a * (p + e).
template <typename S>
inline void dd_add_prod(S& hi, S& lo, const S& a, const S& p, const S& e) {
  S q, qe;
  two_prod(a, p, q, qe);
  dd_add(hi, lo, q);
  lo = lo + fma_of(a, e, qe);
}

// rstd * (g - c1 - xhat * c2) + r, with g, c1, c2, rstd and xhat double-doubles, rounded
// once.
template <typename S>
inline S f64_dx(const S& g, const S& g_lo, const S& xp, const S& xe, const S& neg_c1,
                const S& c1_lo, const S& c2, const S& c2_lo, const S& rstd, const S& rstd_lo,
                const S& r) {
  S a, ae;
  two_sum(g, neg_c1, a, ae);
  ae = ae + (g_lo - c1_lo);
  S m, me;
  two_prod(xp, c2, m, me);
  me = me + fma_of(xp, c2_lo, xe * c2);
  S b, be;
  two_sum(a, S(0.0) - m, b, be);
  const S b_lo = be + (ae - me);
  // rstd * b as a double-double, r added to it exactly (r, the gradient of the returned h,
  // may be the larger term: added to the low part it was rounded once more), the low parts.
  S p, pe;
  two_prod(rstd, b, p, pe);
  S q, qe;
  two_sum(p, r, q, qe);
  return dd_value(q, qe + fma_of(rstd, b_lo, fma_of(rstd_lo, b, pe)));
}

// Lanes of the float64 pass 1 over one block: g, g * d, d, d * d as double-doubles, g =
// dy * gamma exactly (gv + gv_lo), d = h * scale - shift exactly (dh + dl).
struct F64BwdLanes {
  VD g{0.0}, g_lo{0.0}, gd{0.0}, gd_lo{0.0}, d{0.0}, d_lo{0.0}, dd{0.0}, dd_lo{0.0};
  DD tg, tgd, td, tdd;  // the block's scalar tail
  template <typename S>
  static void add(S& g, S& g_lo, S& gd, S& gd_lo, S& d, S& d_lo, S& dd, S& dd_lo,
                  const S& h, const S& gv, const S& gv_lo, const S& scale, const S& neg_shift,
                  bool moments) {
    S dh, dl;
    two_sum(h * scale, neg_shift, dh, dl);
    dd_add(g, g_lo, gv);
    g_lo = g_lo + gv_lo;
    dd_add_prod(gd, gd_lo, gv, dh, dl);
    gd_lo = fma_of(gv_lo, dh, gd_lo);
    if (moments) {
      dd_add(d, d_lo, dh);
      d_lo = d_lo + dl;
      S p, e;
      two_prod(dh, dh, p, e);
      dd_add(dd, dd_lo, p);
      dd_lo = dd_lo + fma_of(dh + dh, dl, e);
    }
  }
  static void total(DD& t, const VD& hi, const VD& lo, const DD& tail) {
    __at_align__ double h[VD::size()];
    hi.store(h);
    for (double v : h) t.add(v);
    t.lo += reduce_add(lo);
    t.add(tail);
  }
};

// a * b for double-doubles, to about 2^-100 relative.
inline DD dd_mul(const DD& a, double b, double b_lo) {
  DD r;
  two_prod(a.hi, b, r.hi, r.lo);
  r.lo += a.hi * b_lo + a.lo * b;
  return r;
}

void norm_bwd_f64(const NormBwdArgs& args, const at::Tensor& partials) {
  using V = VD;
  const int64_t M = args.M;
  const int64_t N = args.N;
  const double* dy_base = args.grad_out.const_data_ptr<double>();
  const double* dres_base =
      args.grad_residual_out.defined() ? args.grad_residual_out.const_data_ptr<double>() : nullptr;
  const double* h_base = args.h.const_data_ptr<double>();  // from the output: y
  const double* mean_base = args.mean.defined() ? args.mean.const_data_ptr<double>() : nullptr;
  const double* rstd_base = args.rstd.const_data_ptr<double>();
  const ParamRow<double> gamma_row(args.gamma, N, 1.0);
  const double* gamma = gamma_row.get();
  const bool from_output = args.from_output;
  const ParamRow<double> beta_row(args.beta, N, 0.0);
  if (from_output) inverse_weight<double>(gamma, N);  // checks for zeros
  double* dx_base = args.grad_h.defined() ? args.grad_h.mutable_data_ptr<double>() : nullptr;
  double* dxin_base =
      args.grad_input.defined() ? args.grad_input.mutable_data_ptr<double>() : nullptr;
  const DropoutKey drop_key = dxin_base ? bwd_dropout_key(args) : DropoutKey{};
  const double drop_scale = dxin_base ? dropout_scale<double>(args.dropout_p) : 0.0;
  double* partial_base = partials.defined() ? partials.mutable_data_ptr<double>() : nullptr;
  const int64_t rows_per_chunk = bwd_chunk_rows(M, N);
  const int64_t chunks = bwd_chunks(M, N);
  TORCH_CHECK(!partials.defined() || (partials.size(0) == chunks && partials.size(1) == 4),
              "addnorm: backward partials of shape ", partials.sizes(), ", expected [", chunks,
              ", 4, ", N, "]");
  const bool rms = args.rms;
  const bool own_stats = args.eps.has_value();
  const double eps = args.eps.value_or(0.0);
  const double nd = static_cast<double>(N);
  // The weight and bias gradients alone need xhat only: no dh, and pass 1 only for the
  // statistics of h itself.
  const bool want_dh = dx_base || dxin_base;

  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::unique_ptr<double[]> gs(new double[2 * N]);  // g of the row, as hi and lo rows
    double* gs_lo = gs.get() + N;
    std::unique_ptr<double[]> xr(from_output ? new double[N] : nullptr);  // xhat from y
    std::unique_ptr<double[]> fac(dxin_base ? new double[N] : nullptr);   // dropout factors
    for (int64_t c = c_begin; c < c_end; ++c) {
      // dgamma (hi, lo), dbeta (hi, lo)
      double* pg = partial_base ? partial_base + c * 4 * N : nullptr;
      double* pg_lo = pg ? pg + N : nullptr;
      double* pb = pg ? pg + 2 * N : nullptr;
      double* pb_lo = pg ? pg + 3 * N : nullptr;
      if (pg) {
        std::fill(pg, pg + 4 * N, 0.0);
      }
      const int64_t row_begin = c * rows_per_chunk;
      const int64_t row_end = std::min(M, row_begin + rows_per_chunk);
      for (int64_t i = row_begin; i < row_end; ++i) {
        const double* dy = dy_base + i * N;
        const double* h = h_base + i * N;
        // The shift (saved mean) and rstd, at a scale where h - mean cannot overflow (rows
        // with |h| beyond ~1e270 have rstd below 2^-900). From the output: h is xhat itself
        // (shift 0, scale 1, its rstd 1).
        F64Stats st;
        st.mean_hi = mean_base ? mean_base[i] : 0.0;
        st.rstd_hi = rstd_base[i];
        if (from_output) {
          const double* beta = beta_row.get();
          int64_t j = 0;
          for (; j + V::size() <= N; j += V::size()) {
            ((V::loadu(h + j) - V::loadu(beta + j)) / V::loadu(gamma + j)).store(xr.get() + j);
          }
          for (; j < N; ++j) xr[j] = (h[j] - beta[j]) / gamma[j];
          h = xr.get();
          st.rstd_hi = 1.0;
        } else if (st.rstd_hi < 0x1p-900) {
          st.scale = 0x1p-600;
          st.mean_hi *= st.scale;
          st.rstd_hi /= st.scale;
        }
        const V shift_scale_v(st.scale), neg_shift_v(-st.mean_hi);

        // Pass 1: g, and the sums of g, g * d, d, d * d.
        DD sum_g, sum_gd, sum_d, sum_dd;
        for (int64_t b0 = 0; b0 < N && (want_dh || own_stats); b0 += kBlock) {
          const int64_t b1 = std::min(N, b0 + kBlock);
          F64BwdLanes acc;
          int64_t j = b0;
          for (; j + V::size() <= b1; j += V::size()) {
            V g, g_lo;
            two_prod(V::loadu(dy + j), V::loadu(gamma + j), g, g_lo);
            g.store(gs.get() + j);
            g_lo.store(gs_lo + j);
            F64BwdLanes::add(acc.g, acc.g_lo, acc.gd, acc.gd_lo, acc.d, acc.d_lo, acc.dd,
                             acc.dd_lo, V::loadu(h + j), g, g_lo, shift_scale_v, neg_shift_v,
                             own_stats);
          }
          for (; j < b1; ++j) {
            double g, g_lo;
            two_prod(dy[j], gamma[j], g, g_lo);
            gs[j] = g;
            gs_lo[j] = g_lo;
            F64BwdLanes::add(acc.tg.hi, acc.tg.lo, acc.tgd.hi, acc.tgd.lo, acc.td.hi,
                             acc.td.lo, acc.tdd.hi, acc.tdd.lo, h[j], g, g_lo, st.scale,
                             -st.mean_hi, own_stats);
          }
          F64BwdLanes::total(sum_g, acc.g, acc.g_lo, acc.tg);
          F64BwdLanes::total(sum_gd, acc.gd, acc.gd_lo, acc.tgd);
          F64BwdLanes::total(sum_d, acc.d, acc.d_lo, acc.td);
          F64BwdLanes::total(sum_dd, acc.dd, acc.dd_lo, acc.tdd);
        }
        // mean = shift + delta and rstd (own statistics), and sum(g * xhat) / rstd at the
        // row's scale.
        DD sum_gx = sum_gd;  // sum(g * (h * scale - mean)), the sum of g * xhat / rstd
        bool have_gx = true;
        if (own_stats) {
          const double eps_s = eps * st.scale * st.scale;
          const bool fits =
              std::isfinite(sum_d.hi) && std::isfinite(sum_dd.hi) &&
              (eps_s >= std::numeric_limits<double>::min() || sum_dd.hi >= 0x1p-968);
          if (fits) {
            double delta = 0.0, delta_lo = 0.0;
            if (!rms) dd_div(sum_d, nd, delta, delta_lo);
            double var, var_lo;
            dd_div(sum_dd, nd, var, var_lo);
            DD v{var, var_lo};
            double p, pe;
            two_prod(delta, delta, p, pe);
            v.add(-p);
            v.lo -= pe + 2.0 * delta * delta_lo;
            if (v.hi < 0.0 || (v.hi == 0.0 && v.lo < 0.0)) v = DD{};  // rounded below 0
            double a, b;
            two_sum(v.hi, eps_s, a, b);
            dd_rsqrt(a, std::isfinite(a) ? b + v.lo : 0.0, st.rstd_hi, st.rstd_lo);
            st.mean_lo = delta + delta_lo;
            dd_add_prod(sum_gx.hi, sum_gx.lo, -delta, sum_g.hi, sum_g.lo);
          } else {
            // Sums beyond the double range, or squares underflowing with eps ~ 0: the
            // forward's rescaled statistics, and sum(g * xhat) again (rare).
            const DD sum_h = rms ? DD{}
                                 : blocked_sum(
                                       N,
                                       [&](int64_t j, V& a0, V& a1) {
                                         a0 = V::loadu(h + j);
                                         a1 = V::loadu(h + j + V::size());
                                       },
                                       [&](int64_t j) { return h[j]; });
            st = f64_stats(h, N, eps, rms, sum_h);
            sum_gx = DD{};
            for (int64_t j = 0; j < N; ++j) {
              double xp, xe;
              f64_xhat(h[j], st.scale, -st.mean_hi, st.mean_lo, st.rstd_hi, st.rstd_lo, xp, xe);
              dd_add_prod(sum_gx.hi, sum_gx.lo, gs[j], xp, xe);
              sum_gx.lo += gs_lo[j] * xp;
            }
            have_gx = false;  // sum_gx is already sum(g * xhat)
          }
        }
        double c1 = 0.0, c1_lo = 0.0, c2, c2_lo;
        if (!rms) dd_div(sum_g, nd, c1, c1_lo);
        dd_div(have_gx ? dd_mul(sum_gx, st.rstd_hi, st.rstd_lo) : sum_gx, nd, c2, c2_lo);
        const double rstd = from_output ? rstd_base[i] : st.rstd_hi * st.scale;  // of h itself
        const double rstd_lo = from_output ? 0.0 : st.rstd_lo * st.scale;

        // Pass 2: dh = rstd * (g - c1 - xhat * c2) (+ grad of the returned h); partials.
        const V scale_v(st.scale), neg_mean_v(-st.mean_hi), mean_lo_v(st.mean_lo),
            rstd_s_v(st.rstd_hi),
            rstd_s_lo_v(st.rstd_lo), neg_c1_v(-c1), c1_lo_v(c1_lo), c2_v(c2), c2_lo_v(c2_lo),
            rstd_v(rstd), rstd_lo_v(rstd_lo);
        double* dx = dx_base ? dx_base + i * N : nullptr;
        double* dxin = dxin_base ? dxin_base + i * N : nullptr;
        if (dxin) dropout_factors_fast(drop_key, drop_scale, i * N, N, fac.get());
        const double* dres = dres_base ? dres_base + i * N : nullptr;
        int64_t j = 0;
        for (; j + V::size() <= N; j += V::size()) {
          V xp, xe;
          f64_xhat(V::loadu(h + j), scale_v, neg_mean_v, mean_lo_v, rstd_s_v, rstd_s_lo_v, xp,
                   xe);
          const V d = V::loadu(dy + j);  // (before the stores: dx or dxin may be dy's memory)
          if (want_dh) {
            const V v = f64_dx(V::loadu(gs.get() + j), V::loadu(gs_lo + j), xp, xe, neg_c1_v,
                               c1_lo_v, c2_v, c2_lo_v, rstd_v, rstd_lo_v,
                               dres ? V::loadu(dres + j) : V(0.0));
            if (dx) v.store(dx + j);
            if (dxin) (v * V::loadu(fac.get() + j)).store(dxin + j);
          }
          if (pg) {
            V gh = V::loadu(pg + j), gl = V::loadu(pg_lo + j);
            dd_add_prod(gh, gl, d, xp, xe);
            gh.store(pg + j);
            gl.store(pg_lo + j);
            V bh = V::loadu(pb + j), bl = V::loadu(pb_lo + j);
            dd_add(bh, bl, d);
            bh.store(pb + j);
            bl.store(pb_lo + j);
          }
        }
        for (; j < N; ++j) {
          double xp, xe;
          f64_xhat(h[j], st.scale, -st.mean_hi, st.mean_lo, st.rstd_hi, st.rstd_lo, xp, xe);
          const double d = dy[j];
          if (want_dh) {
            const double v = f64_dx(gs[j], gs_lo[j], xp, xe, -c1, c1_lo, c2, c2_lo, rstd,
                                    rstd_lo, dres ? dres[j] : 0.0);
            if (dx) dx[j] = v;
            if (dxin) dxin[j] = v * fac[j];
          }
          if (pg) {
            dd_add_prod(pg[j], pg_lo[j], d, xp, xe);
            dd_add(pb[j], pb_lo[j], d);
          }
        }
      }
    }
  });
}

template <typename T>
void norm_fwd_reduced(const NormFwdArgs& args) {
  if (args.residual.defined() && args.dtypes.residual == at::kFloat) {
    norm_fwd_typed<T, float, float>(args);
  } else if (args.dtypes.h == at::kFloat) {
    norm_fwd_typed<T, T, float>(args);
  } else {
    norm_fwd_typed<T, T, T>(args);
  }
}

template <typename G>
void norm_bwd_reduced(const NormBwdArgs& args, const at::Tensor& partials) {
  if (args.dtypes.h == at::kFloat) {
    norm_bwd_typed<G, float>(args, partials);
  } else {
    norm_bwd_typed<G, G>(args, partials);
  }
}

}  // namespace

void norm_fwd_kernel(const NormFwdArgs& args) {
  switch (args.dtypes.x) {
    case at::kFloat:
      return norm_fwd_typed<float, float, float>(args);
    case at::kDouble:
      return norm_fwd_f64(args);
    case at::kBFloat16:
      return norm_fwd_reduced<c10::BFloat16>(args);
    case at::kHalf:
      return norm_fwd_reduced<c10::Half>(args);
    default:
      TORCH_CHECK(false, "addnorm: unsupported input dtype ", args.dtypes.x);
  }
}

// float32 and float64 grad_out come with an h of their own dtype (ops/norm_checks.cpp).
void norm_bwd_kernel(const NormBwdArgs& args, const at::Tensor& partials) {
  switch (args.dtypes.x) {
    case at::kFloat:
      return norm_bwd_typed<float, float>(args, partials);
    case at::kDouble:
      return norm_bwd_f64(args, partials);
    case at::kBFloat16:
      return norm_bwd_reduced<c10::BFloat16>(args, partials);
    case at::kHalf:
      return norm_bwd_reduced<c10::Half>(args, partials);
    default:
      TORCH_CHECK(false, "addnorm: unsupported grad_out dtype ", args.dtypes.x);
  }
}

void dropout_apply_kernel(const DropoutApplyArgs& args) {
  const int64_t* s = args.seed.const_data_ptr<int64_t>();
  const DropoutKey key = dropout_key(s[0], s[1], args.p);
  const int64_t n = args.input.numel();
  constexpr int64_t kGrain = 16384;  // a multiple of 128: chunks start on whole Philox blocks
  auto run = [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    using Acc = acc_t<In>;
    const In* in = args.input.const_data_ptr<In>();
    Out* out = args.out.mutable_data_ptr<Out>();
    const Acc scale = dropout_scale<Acc>(args.p);
    at::parallel_for(0, (n + kGrain - 1) / kGrain, 1, [&](int64_t c0, int64_t c1) {
      std::unique_ptr<Acc[]> fac(new Acc[kGrain]);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t e0 = c * kGrain;
        const int64_t len = std::min(kGrain, n - e0);
        dropout_factors_fast(key, scale, e0, len, fac.get());
        for (int64_t j = 0; j < len; ++j) {
          out[e0 + j] = static_cast<Out>(static_cast<Acc>(in[e0 + j]) * fac[j]);
        }
      }
    });
  };
  // The dtypes the checks allow: the input's, or float16/bfloat16 out of float32.
  const auto in_dtype = args.input.scalar_type();
  const auto out_dtype = args.out.scalar_type();
  if (in_dtype == at::kDouble) return run(double{}, double{});
  if (in_dtype == at::kBFloat16) return run(c10::BFloat16{}, c10::BFloat16{});
  if (in_dtype == at::kHalf) return run(c10::Half{}, c10::Half{});
  if (out_dtype == at::kBFloat16) return run(float{}, c10::BFloat16{});
  if (out_dtype == at::kHalf) return run(float{}, c10::Half{});
  return run(float{}, float{});
}

namespace {

// n doubles at src into t from element j0, rounded to t's dtype as copy_ rounds them.
void store_as(const at::Tensor& t, int64_t j0, const double* src, int64_t n) {
  switch (t.scalar_type()) {
    case at::kDouble:
      return at::vec::convert(src, t.mutable_data_ptr<double>() + j0, n);
    case at::kFloat:
      return at::vec::convert(src, t.mutable_data_ptr<float>() + j0, n);
    case at::kBFloat16:
      return at::vec::convert(src, t.mutable_data_ptr<c10::BFloat16>() + j0, n);
    case at::kHalf:
      return at::vec::convert(src, t.mutable_data_ptr<c10::Half>() + j0, n);
    default:
      TORCH_CHECK(false, "addnorm: unsupported parameter gradient dtype ", t.scalar_type());
  }
}

}  // namespace

void norm_bwd_reduce_kernel(const at::Tensor& partials, const at::Tensor& grad_gamma,
                            const at::Tensor& grad_beta) {
  const int64_t chunks = partials.size(0);
  const int64_t K = partials.size(1);  // 2: double partials; 4: double-double partials
  const int64_t N = partials.size(2);
  TORCH_CHECK(K == 2 || K == 4, "addnorm: backward partials with ", K, " rows per chunk");
  const double* p = partials.const_data_ptr<double>();
  // Columns are independent: each is summed over the chunks in chunk order (starting from
  // the first chunk's value: one chunk's sums pass unchanged), whichever thread takes it,
  // a tile at a time, and rounded to the gradient's dtype.
  constexpr int64_t kTile = 512;
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    double sums[kTile];
    for (int64_t q = 0; q < 2; ++q) {
      const at::Tensor& out = q == 0 ? grad_gamma : grad_beta;
      if (!out.defined()) continue;
      const int64_t row = K == 2 ? q : 2 * q;  // the row of output q in each chunk
      for (int64_t t0 = begin; t0 < end; t0 += kTile) {
        const int64_t t1 = std::min(end, t0 + kTile);
        int64_t j = t0;
        for (; j + VD::size() <= t1; j += VD::size()) {
          const double* src = p + row * N + j;
          VD hi = VD::loadu(src);
          VD lo = K == 2 ? VD(0.0) : VD::loadu(src + N);
          for (int64_t c = 1; c < chunks; ++c) {
            src = p + (c * K + row) * N + j;
            if (K == 2) {
              hi = hi + VD::loadu(src);
            } else {
              dd_add(hi, lo, VD::loadu(src));
              lo = lo + VD::loadu(src + N);
            }
          }
          (K == 2 ? hi : dd_value(hi, lo)).store(sums + (j - t0));
        }
        for (; j < t1; ++j) {
          const double* src = p + row * N + j;
          double hi = *src;
          double lo = K == 2 ? 0.0 : src[N];
          for (int64_t c = 1; c < chunks; ++c) {
            src = p + (c * K + row) * N + j;
            if (K == 2) {
              hi += *src;
            } else {
              dd_add(hi, lo, *src);
              lo += src[N];
            }
          }
          sums[j - t0] = K == 2 ? hi : dd_value(hi, lo);
        }
        store_as(out, t0, sums, t1 - t0);
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace addnorm::cpu
