// CUDA kernels of the fused residual-add + LayerNorm / RMSNorm ops, registered at the end of
// this file as the CUDA kernels of _norm_fwd / _norm_bwd / _dropout_apply (ops/norm_register.h).
//
// Forward, per row of N elements: h = x (+ residual) in fp32 (fp64 for fp64), rounded to h's
// dtype (and stored when asked for); mean and rstd of the rounded h with the row sums in
// double (double-double for fp64; a 16-bit h on the register path: each thread's partial
// in float, see kFloatPartials): two-pass in registers, or sums of h - shift (shift =
// the row's first h) in one sweep when looping; out = (h - mean) * rstd * gamma + beta in x's
// dtype, with the float32 mean and rstd carrying the rounding error of their double values
// (so the output is as accurate as if the statistics were exact); float64: mean and rstd as
// double-doubles, h - mean kept exactly, the affine step rounded once (as the CPU kernels).
// Backward, per row: grad_h = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma
// (RMS drops mean(g)), plus grad_residual_out. float32 data, and float16/bfloat16 data with
// a float32 h ("the wide backward"): as the CPU kernels, in double from the statistics of h
// itself (given the forward's eps), g exact, grad_h rounded once; float64 the same in
// double-double. bfloat16/float16 data with a 16-bit h: the saved statistics, float lanes
// with g rounded once, the row sums in double (each vector's terms summed in float first).
// grad_gamma / grad_beta from per-chunk partials (fp64 for float32 and float64 data, the
// float64 looping path's from double-double sums; fp32 for bfloat16/float16; the register
// path's float32 grad_beta partial is a float32 sum of the chunk's dy, widened) summed in
// double (double-double for fp64 partials) by a finalize kernel
// in a fixed order, the chunks fixed by M, N and the path (register or looping, below:
// chosen by N and the pointers' alignment), so bitwise reproducible, also across GPUs and
// grid sizes; no atomics. From the output
// (memory_efficient): xhat = (y - beta) / gamma, read from the forward's output y.
//
// Paths, chosen at run time per call:
//   register path  the row lives in registers; threads per row (TPR) sized to N: several
//                  rows per warp for tiny N, warp-per-row for small N, block-per-row up to
//                  1024 threads; needs 16-byte vector access (every pointer aligned, N % VEC
//                  == 0) and N <= 1024 * VPT * VEC.
//   looping path   any larger N: statistics in a first sweep over the row, output in a
//                  second; with 16-byte vectors when aligned, else one element at a time
//                  (unaligned views, odd N).
// Kernels are templated on the dtypes (T input/output, R residual, H h, W weight) and on
// RMS; residual / weight / bias / h-store presence are run-time flags (uniform branches).

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/norm_utils.cuh"
#include "ops/dropout_mask.h"
#include "ops/norm_register.h"

#ifndef ADDNORM_CUDA_BWD_AHEAD  // (CMake's option of that name; the emulation's build)
#define ADDNORM_CUDA_BWD_AHEAD 1
#endif

// Turns a run-time bool into a constexpr bool NAME visible to the lambda body.
#define ADDNORM_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                      \
    if (COND) {                              \
      constexpr bool NAME = true;            \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr bool NAME = false;           \
      return __VA_ARGS__();                  \
    }                                        \
  }()

namespace addnorm::cuda {
namespace {

using namespace detail;

// Elements per 16-byte vector of the input dtype.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// Bytes of fp32/fp64 values of `vectors` vectors of VEC elements.
template <typename T>
constexpr int vec_acc_bytes(int vectors) {
  return vectors * kVec<T> * static_cast<int>(sizeof(at::opmath_type<T>));
}

template <typename T>
constexpr bool kHalfData = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;

// Vectors per thread in the register paths (1024 threads, 64 registers): the forward holds
// 16 elements of h per thread (8 for fp64), whose loads of x and the residual it issues
// together (load_h_vectors); the backward holds dy, xhat and the two weight-gradient
// accumulators, 8 elements each (2 for fp64, whose arithmetic needs more temporaries; fp32's
// dy * xhat accumulator in double).
template <typename T>
constexpr int kFwdVpt = std::max(1, 64 / vec_acc_bytes<T>(1));
template <typename T>
constexpr int kBwdVpt = std::is_same_v<T, double> ? 1 : std::max(1, 32 / vec_acc_bytes<T>(1));

// Looping kernels: at most 512 threads per row (128 registers), each with up to 64 bytes
// of values (U vectors of VEC elements, U <= 8) in flight per step.
constexpr int kLoopMaxThreads = 512;
template <typename A, int VEC>
constexpr int kLoopUnroll = std::clamp(64 / (VEC * static_cast<int>(sizeof(A))), 1, 8);

// Block shape of the column kernels (weight-gradient partials and finalize).
constexpr int kColTile = 32;
constexpr int kColRows = 16;

template <typename T, typename R, typename H, typename W>
struct FwdParams {
  using A = at::opmath_type<T>;
  const T* x;         // [M, N]
  const R* residual;  // [M, N]; nullptr when absent
  const W* gamma;     // [N]; nullptr when absent
  const W* beta;      // [N]; nullptr when absent
  T* out;             // [M, N]
  H* h_out;           // [M, N]; nullptr when h is not stored
  A* mean;            // [M]; nullptr for RMS
  A* rstd;            // [M]
  int64_t M;
  int64_t N;
  RowLength len;  // N and 1 / N
  double eps;
  // Fused dropout of x: the seed tensor's data ([2] int64 on the device, read by the kernel
  // so that a CUDA graph replays with the seed of each replay), nullptr without dropout.
  const int64_t* drop_seed;
  uint64_t drop_threshold;
  A drop_scale;
};

// The weight-gradient partials' type: double for float32 data (the products of the wide
// backward, summed without a float32 rounding), else the compute type (float for
// bfloat16/float16, double for float64).
template <typename T>
using part_t = std::conditional_t<std::is_same_v<T, float>, double, at::opmath_type<T>>;

template <typename T, typename H, typename W>
struct BwdParams {
  using A = at::opmath_type<T>;
  const T* dy;       // [M, N] grad of out
  const H* dres;     // [M, N] grad of h (residual_out); nullptr when absent
  const H* h;        // [M, N]; nullptr from the output
  const T* y;        // [M, N] the forward's output (memory_efficient); else nullptr
  const A* mean;     // [M]; nullptr for RMS and from the output
  const A* rstd;     // [M]
  const W* gamma;    // [N]; nullptr when absent
  const W* beta;     // [N]; from the output only; nullptr when absent
  H* dh;             // [M, N] grad of h (output); nullptr when not wanted (dropout only)
  // The forward's fused dropout: the input's gradient, grad_h (as rounded to H) times the
  // regenerated keep-mask and scale, in T, written in the same pass; nullptr without dropout.
  T* dx;
  const int64_t* drop_seed;  // [2] on the device, with dx only
  uint64_t drop_threshold;
  at::opmath_type<H> drop_scale;
  part_t<T>* part_gamma;  // [P, N] per-chunk partial sums of dy * xhat; nullptr: not wanted
  part_t<T>* part_beta;   // [P, N] per-chunk partial sums of dy; nullptr when not wanted
  int64_t M;
  int64_t N;
  RowLength len;     // N and 1 / N
  // Register path: rows per weight-gradient chunk (a multiple of the CTA's rows); partial
  // row c sums rows [c * chunk_rows, (c + 1) * chunk_rows).
  int64_t chunk_rows;
  // The wide and float64 backward (below: float32 and float64 data, float16/bfloat16 data
  // with a float32 h): own_stats when the
  // forward's eps is given and the backward reads h: the row statistics of h itself, with
  // that eps.
  bool own_stats;
  bool eps_given;  // the forward's eps is given and the backward reads h
  double eps;
  // Looping path, float32 / float64 from h with the weight's gradient wanted, for the partials
  // kernel: per row, float32 [3, M] shift, xs and x_off (xhat = (h - shift) * xs + x_off);
  // float64 [4, M] shift, mean_lo, rx and rx_lo (F64Row); else nullptr.
  double* row_xform;
};

// The fused dropout's keep-mask of VEC elements of x at element offset off
// (ops/dropout_mask.h): bit j set where element off + j is kept; the CPU kernels' mask. A
// vector of more than one element starts at a multiple of VEC (its rows' lengths are
// multiples of VEC: the one-element path takes all other rows), so it lies in one Philox
// group (VEC divides eight) and takes its halves of the group's words by static index; its
// ties with the threshold, if any, in one call.
template <int VEC>
__device__ __forceinline__ uint32_t dropout_keep_bits(const int64_t* __restrict__ seed,
                                                      uint64_t threshold, int64_t off) {
  static_assert(kDropoutGroup % VEC == 0, "a vector lies in one Philox group");
  const DropoutKey k{static_cast<uint64_t>(__ldg(seed)), static_cast<uint64_t>(__ldg(seed + 1)),
                     threshold};
  const auto uoff = static_cast<uint64_t>(off);
  const auto bits = dropout_bits(k, uoff / kDropoutGroup);
  const int i0 = static_cast<int>(uoff % kDropoutGroup);  // 0 for VEC = 8
  const uint32_t hi = dropout_threshold_hi(k);
  uint32_t keep = 0;
  uint32_t ties = 0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    // Word (i0 + j) / 2 of the group: i0 is a multiple of VEC, so for VEC = 8 word j / 2, for
    // VEC = 4 word j / 2 or j / 2 + 2, for VEC = 2 any word; half j % 2 (i0 is even) unless
    // VEC = 1.
    const int q = VEC == 8 ? j / 2 : VEC == 4 ? j / 2 + (i0 != 0 ? 2 : 0) : i0 / 2;
    const uint32_t r = dropout_half(dropout_word(bits, q), VEC == 1 ? i0 : j);
    keep |= static_cast<uint32_t>(r < hi) << j;
    ties |= static_cast<uint32_t>(r == hi) << j;
  }
  if (ties != 0) {  // once in 65536 elements
    keep |= dropout_ties(k, uoff, ties);
  }
  return keep;
}

// v times the keep bits (dropout_keep_bits) and scale: kept ones times the scale, dropped
// ones 0. Rounded here (never fused with the residual's add: h rounds twice, as torch's
// dropout then add and the CPU kernels); a dropped inf gives NaN, as torch's.
template <int VEC, typename A>
__device__ __forceinline__ void scale_kept(uint32_t keep, A scale, A (&v)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    v[j] = mul_rn(v[j], (keep >> j & 1u) != 0 ? scale : A(0));
  }
}

template <int VEC, typename A>
__device__ __forceinline__ void apply_dropout(const int64_t* __restrict__ seed,
                                              uint64_t threshold, A scale, int64_t off,
                                              A (&v)[VEC]) {
  scale_kept<VEC>(dropout_keep_bits<VEC>(seed, threshold, off), scale, v);
}

// grad_h for VEC elements at element offset off (when wanted) and, with the fused dropout,
// the input's gradient from it: bitwise what _dropout_apply over the stored grad_h gives
// (dropout_apply_kernel<H, T>), without grad_h's round trip through memory.
// (Not inlined: the mask's generator would otherwise raise the register pressure of every
// backward kernel, with or without dropout, into spills; a call only where dropout runs.)
template <int VEC, typename T, typename H>
__device__ __noinline__ void store_dropout_grad(const int64_t* __restrict__ seed,
                                                uint64_t threshold, at::opmath_type<H> scale,
                                                int64_t off, Vec<H, VEC> grad_h,
                                                T* __restrict__ dx) {
  using AH = at::opmath_type<H>;
  AH g[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    g[j] = static_cast<AH>(grad_h.val[j]);
  }
  apply_dropout<VEC>(seed, threshold, scale, off, g);
  store_vec<VEC>(dx + off, g);
}

template <int VEC, typename T, typename H, typename W, typename V>
__device__ __forceinline__ void store_grads(const BwdParams<T, H, W>& p, int64_t off,
                                            const V (&dx)[VEC]) {
  if (p.dh != nullptr) {
    store_vec<VEC>(p.dh + off, dx);
  }
  if (p.dx != nullptr) {
    Vec<H, VEC> g;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      g.val[j] = static_cast<H>(dx[j]);
    }
    store_dropout_grad<VEC, T, H>(p.drop_seed, p.drop_threshold, p.drop_scale, off, g, p.dx);
  }
}

// The bytes of a vector of VEC elements of U as loaded (one or two 16-byte words, or one
// narrower word), unpacked where they are used: a vector of 16-bit structs assigned under a
// branch ends up in local memory.
template <typename U, int VEC>
struct RawVec {
  static constexpr int kBytes = static_cast<int>(sizeof(U)) * VEC;
  static_assert(kBytes % 16 == 0 || kBytes <= 8, "one narrow word or whole 16-byte words");
  using Word = std::conditional_t<
      kBytes >= 16, uint4,
      std::conditional_t<kBytes == 8, uint2,
                         std::conditional_t<kBytes == 4, unsigned int, unsigned short>>>;
  Word q[kBytes >= 16 ? kBytes / 16 : 1];
};

template <typename U, int VEC>
__device__ __forceinline__ void load_raw(const U* __restrict__ ptr, RawVec<U, VEC>& r) {
  r = load_readonly<RawVec<U, VEC>>(ptr);
}

template <int VEC, typename U, typename A>
__device__ __forceinline__ void unpack_raw(const RawVec<U, VEC>& r, A (&dst)[VEC]) {
  Vec<U, VEC> v;
  memcpy(&v, r.q, sizeof(v));
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    dst[j] = static_cast<A>(v.val[j]);
  }
}

// VEC values of h held in registers by the forward kernels, in h's own dtype: a bfloat16 /
// float16 h two to a 32-bit register (half the registers of float values, which leaves room
// for a row's loads in flight together); exact, h being rounded to its dtype when it is made.
// float32 / float64 h, and one-element vectors, as the compute type A.
template <typename H, typename A, int VEC, bool kPacked = kHalfData<H> && VEC % 2 == 0>
struct HSlot {
  A v[VEC];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[j] = A(0);
    }
  }
  // h = s rounded to H.
  __device__ __forceinline__ void set(const A (&s)[VEC]) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[j] = static_cast<A>(static_cast<H>(s[j]));
    }
  }
  template <typename U>
  __device__ __forceinline__ void set_bits(const RawVec<U, VEC>& raw) {
    unpack_raw<VEC>(raw, v);
  }
  __device__ __forceinline__ A operator[](int j) const { return v[j]; }
  __device__ __forceinline__ void get(A (&dst)[VEC]) const {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dst[j] = v[j];
    }
  }
  __device__ __forceinline__ void store(H* __restrict__ ptr) const { store_vec<VEC>(ptr, v); }
};

template <typename H, typename A, int VEC>
struct HSlot<H, A, VEC, true> {
  static_assert(VEC % 2 == 0, "16-bit values packed in pairs");
  uint32_t w[VEC / 2];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int k = 0; k < VEC / 2; ++k) {
      w[k] = 0u;
    }
  }
  __device__ __forceinline__ void set(const A (&s)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC / 2; ++k) {
      const H lo = static_cast<H>(s[2 * k]);
      const H hi = static_cast<H>(s[2 * k + 1]);
      w[k] = static_cast<uint32_t>(lo.x) | static_cast<uint32_t>(hi.x) << 16;
    }
  }
  // h = x itself (x of h's dtype, no residual, no dropout): its bits.
  __device__ __forceinline__ void set_bits(const RawVec<H, VEC>& raw) {
    memcpy(w, raw.q, sizeof(w));
  }
  __device__ __forceinline__ A operator[](int j) const {
    const auto bits = static_cast<uint16_t>(w[j / 2] >> (16 * (j % 2)));
    return static_cast<A>(H(bits, H::from_bits()));
  }
  __device__ __forceinline__ void get(A (&dst)[VEC]) const {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dst[j] = (*this)[j];
    }
  }
  __device__ __forceinline__ void store(H* __restrict__ ptr) const {
    Vec<H, VEC> v;
    memcpy(&v, w, sizeof(w));
    *reinterpret_cast<Vec<H, VEC>*>(ptr) = v;
  }
};

// h = dropout(x) (+ residual) for NV vectors of VEC elements of a row, vector i at vector
// index first + i * stride where it is below row_vecs, into slots: rounded to H once (x's
// bits where h is x itself). The dropout's keep bits first (a function of the offsets
// alone), then every load, so that all of them are in flight together (a load consumed
// before the next is issued waits out the memory latency each time) and the generator's
// registers are free again before the loads' data arrive.
template <int VEC, int NV, typename T, typename R, typename H, typename W, typename A>
__device__ __forceinline__ void load_h_vectors(const FwdParams<T, R, H, W>& p, int64_t row_off,
                                               int64_t first, int64_t stride, int64_t row_vecs,
                                               HSlot<H, A, VEC> (&h)[NV]) {
  static_assert(NV * VEC <= 32, "the keep bits in one word");
  uint32_t keep = 0;
  if (p.drop_seed != nullptr) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t vi = first + i * stride;
      if (vi < row_vecs) {
        keep |= dropout_keep_bits<VEC>(p.drop_seed, p.drop_threshold, row_off + vi * VEC)
                << (i * VEC);
      }
    }
  }
  RawVec<T, VEC> xv[NV] = {};
  RawVec<R, VEC> rv[NV] = {};
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int64_t vi = first + i * stride;
    if (vi < row_vecs) {
      load_raw(p.x + row_off + vi * VEC, xv[i]);
      if (p.residual != nullptr) {
        load_raw(p.residual + row_off + vi * VEC, rv[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if (first + i * stride >= row_vecs) {
      h[i].zero();
    } else if (p.residual == nullptr && p.drop_seed == nullptr) {
      h[i].set_bits(xv[i]);
    } else {
      A v[VEC];
      unpack_raw<VEC>(xv[i], v);
      if (p.drop_seed != nullptr) {
        scale_kept<VEC>(keep >> (i * VEC), p.drop_scale, v);
      }
      if (p.residual != nullptr) {
        A r[VEC];
        unpack_raw<VEC>(rv[i], r);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          v[j] += r[j];
        }
      }
      h[i].set(v);
    }
  }
}

// (h - mean) * rstd from the double statistics. float: mean and rstd as float plus the
// rounding error of their double values (the stored float32 statistics are the first parts),
// as the CPU kernels do; double: see Normalizer<double>.
template <typename A>
struct Normalizer;

template <>
struct Normalizer<float> {
  // An rstd past 2^100 (eps = 0 or tiny, rows of float's subnormal size, where it can leave
  // float's range): h - mean_hi is scaled by pre = 2^k (exact: it is small) before mean_lo,
  // scaled alike, is subtracted, and rstd_hi + rstd_lo is rstd / 2^k, in [1, 2); else pre = 1
  // and the fma is the plain subtraction. A finite rstd still past float's range after that
  // (a constant row, eps below 1e-152, where h - mean is exactly 0) is clamped to float's
  // largest value, so the row gives 0 * rstd = 0 as the CPU's; an infinite one stays inf.
  // An rstd below 2^-100 (16-bit rows of values near float's largest, whose h - mean can
  // leave float's range): h and mean_hi are halved first (pin = 1/2, exact there) and
  // rstd_hi + rstd_lo is 2 rstd; else pin = 1 and the product is h itself.
  float mean_hi, mean_lo, rstd_hi, rstd_lo, pre, pin;
  double mean, rstd;  // for float32 output (see normalize_store)
  __device__ __forceinline__ Normalizer(double m, double r) : mean(m), rstd(r) {
    const float mean_f = static_cast<float>(mean);
    double scaled = rstd;
    pre = 1.0f;
    pin = 1.0f;
    if (rstd > 0x1p100 && !isinf(rstd)) {
      const int e = ilogb(rstd);
      const int k = e < 126 ? e : 126;
      pre = ldexpf(1.0f, k);
      scaled = fmin(ldexp(rstd, -k), static_cast<double>(std::numeric_limits<float>::max()));
    } else if (rstd < 0x1p-100) {
      pin = 0.5f;
      scaled = rstd * 2.0;
    }
    mean_hi = mul_rn(mean_f, pin);
    mean_lo = isfinite(mean_f)
                  ? static_cast<float>((mean - static_cast<double>(mean_f)) * pre * pin)
                  : 0.0f;
    rstd_hi = static_cast<float>(scaled);
    rstd_lo = isfinite(rstd_hi) ? static_cast<float>(scaled - static_cast<double>(rstd_hi)) : 0.0f;
  }
  __device__ __forceinline__ float stored_mean() const { return static_cast<float>(mean); }
  // float(rstd): rstd_hi * pre * pin rounds as rstd does (the scalings by powers of two are
  // exact, and overflow to inf where rstd rounds to it)
  __device__ __forceinline__ float stored_rstd() const { return mul_rn(mul_rn(rstd_hi, pre), pin); }
  __device__ __forceinline__ float operator()(float v) const {
    const float d = fma_rn(sub_rn(mul_rn(v, pin), mean_hi), pre, -mean_lo);
    return fma_rn(d, rstd_hi, mul_rn(d, rstd_lo));
  }
};

template <>
struct Normalizer<double> {
  // mean and rstd as double-doubles (mean_hi + mean_lo, rstd_hi + rstd_lo).
  double mean_hi, mean_lo, rstd_hi, rstd_lo;
  __device__ __forceinline__ Normalizer(const DdMoments& m, double eps) {
    mean_hi = m.mean_hi;
    mean_lo = m.mean_lo;
    dd_rstd(m.var_hi, m.var_lo, eps, rstd_hi, rstd_lo);
  }
  __device__ __forceinline__ double stored_mean() const { return mean_hi + mean_lo; }
  __device__ __forceinline__ double stored_rstd() const { return rstd_hi + rstd_lo; }
  // (v - mean) * rstd * gamma + beta: v - mean kept exactly (TwoSum), its product with rstd
  // as a double-double (TwoProd), the affine step rounded once (as the CPU kernels).
  __device__ __forceinline__ double operator()(double v, double gamma, double beta) const {
    double dh, dl;
    two_sum(v, -mean_hi, dh, dl);
    dl = sub_rn(dl, mean_lo);
    const double p = mul_rn(dh, rstd_hi);
    const double y_lo = fma_rn(dh, rstd_hi, -p) + fma_rn(dh, rstd_lo, mul_rn(dl, rstd_hi));
    const double q = mul_rn(p, gamma);
    const double qe = fma_rn(p, gamma, -q);
    double s, se;
    two_sum(q, beta, s, se);
    return isinf(s) ? s : s + fma_rn(y_lo, gamma, se + qe);
  }
};

__device__ __forceinline__ double rstd_of(double var, double eps) { return rsqrt_of(var + eps); }

// The statistics as a Normalizer: float data from the double mean and variance, float64
// from double-double moments.
__device__ __forceinline__ Normalizer<float> make_normalizer(double mean, double var,
                                                             double eps) {
  return Normalizer<float>(mean, rstd_of(var, eps));
}
__device__ __forceinline__ Normalizer<double> make_normalizer(const DdMoments& m, double eps) {
  return Normalizer<double>(m, eps);
}

// A 16-bit h (bfloat16 / float16): a few terms are summed in float and only that partial is
// added to the double row sums (the register path's forward: a thread's VPT * VEC values of
// h; the backward: a vector's VEC). Conversions to double per element, which issue at a
// fraction of float arithmetic's rate, had left the kernels short of memory bandwidth. A
// float sum of a few 16-bit values is exact unless their exponents lie far apart, and a
// few products' sum is within ulps of float, far below h's own precision; where a partial
// left float's range (not finite, or a sum of squares below 2^-100, where float's
// subnormals would lose bits), the same terms are summed again in double, as before. A
// float32 h (residual_in_fp32) keeps the per-element double sums: a float sum of its values
// rounds (a constant row's mean would be an ulp off, and its variance not 0).
template <typename H>
constexpr bool kFloatPartials = kHalfData<H>;

__device__ __forceinline__ bool float_sum_ok(float s) { return isfinite(s); }
__device__ __forceinline__ bool float_squares_ok(float s) {
  return s >= 0x1p-100f && s <= std::numeric_limits<float>::max();  // NaN: false
}

// VEC elements at ptr + i converted to A, or fill where ptr is null (an absent gamma reads
// as 1, an absent beta or grad_residual_out as 0).
template <int VEC, typename U, typename A>
__device__ __forceinline__ void load_or_fill(const U* ptr, int64_t i, A fill, A (&dst)[VEC]) {
  if (ptr != nullptr) {
    load_vec<VEC>(ptr + i, dst);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dst[j] = fill;
    }
  }
}

// out = norm(h) * gamma + beta for the VEC elements at offset off (column col).
template <int VEC, typename T, typename R, typename H, typename W, typename A>
__device__ __forceinline__ void normalize_store(const FwdParams<T, R, H, W>& p, int64_t off,
                                                int64_t col, const A (&h)[VEC],
                                                const Normalizer<A>& norm) {
  if constexpr (std::is_same_v<T, float>) {
    // float32 output: (h - mean) * rstd * gamma + beta in double, rounded once (in float
    // lanes the result is within about an ulp, as torch's, and either can be the larger).
    double y[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      y[j] = (static_cast<double>(h[j]) - norm.mean) * norm.rstd;
    }
    if (p.gamma != nullptr) {
      A g[VEC];
      load_vec<VEC>(p.gamma + col, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        y[j] *= static_cast<double>(g[j]);
      }
    }
    if (p.beta != nullptr) {
      A b[VEC];
      load_vec<VEC>(p.beta + col, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        y[j] += static_cast<double>(b[j]);
      }
    }
    A yf[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      yf[j] = static_cast<A>(y[j]);
    }
    store_vec<VEC>(p.out + off, yf);
  } else if constexpr (std::is_same_v<T, double>) {
    A g[VEC];
    A b[VEC];
    load_or_fill<VEC>(p.gamma, col, A(1), g);
    load_or_fill<VEC>(p.beta, col, A(0), b);
    A y[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      y[j] = norm(h[j], g[j], b[j]);
    }
    store_vec<VEC>(p.out + off, y);
  } else {
    A y[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      y[j] = norm(h[j]);
    }
    if (p.gamma != nullptr) {
      A g[VEC];
      load_vec<VEC>(p.gamma + col, g);
      if (p.beta != nullptr) {
        A b[VEC];
        load_vec<VEC>(p.beta + col, b);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          y[j] = fma_rn(y[j], g[j], b[j]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          y[j] = mul_rn(y[j], g[j]);
        }
      }
    } else if (p.beta != nullptr) {
      A b[VEC];
      load_vec<VEC>(p.beta + col, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        y[j] += b[j];
      }
    }
    store_vec<VEC>(p.out + off, y);
  }
}

// ------------------------------------------------------------------------------------------
// Forward, register path: each thread holds VPT vectors of VEC elements of its row
// (vector i*TPR + tid; in h's dtype, HSlot), so the row is read once and both statistics
// passes (the sum, then the squared deviations from the mean, both in double /
// double-double; see kFloatPartials) run on registers.
template <typename T, typename R, typename H, typename W, bool RMS, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxThreads)
    norm_fwd_register_kernel(const FwdParams<T, R, H, W> p) {
  using A = at::opmath_type<T>;
  using S = stat_t<A>;
  constexpr bool kF64 = std::is_same_v<A, double>;
  __shared__ S red[kMaxWarps * 2];
  const int tpr = blockDim.x;
  const int tid = threadIdx.x;
  const int64_t nvec = p.N / VEC;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < p.M;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const int64_t row_vecs = row < p.M ? nvec : 0;  // rows past M take part in reductions only
    const int64_t row_off = row * p.N;
    HSlot<H, A, VEC> h[VPT];
    load_h_vectors<VEC>(p, row_off, tid, tpr, row_vecs, h);
    if (p.h_out != nullptr) {
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int64_t vi = static_cast<int64_t>(i) * tpr + tid;
        if (vi < row_vecs) {
          h[i].store(p.h_out + row_off + vi * VEC);
        }
      }
    }
    S s[1];
    double mean = 0.0;  // RMSNorm: deviations from 0
    if constexpr (!RMS) {
      stat_zero(s[0]);
      bool summed = false;
      if constexpr (kFloatPartials<H>) {
        float t = 0.0f;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            t += h[i][j];  // out-of-range slots hold zeros
          }
        }
        summed = float_sum_ok(t);
        s[0] = summed ? static_cast<double>(t) : 0.0;
      }
      if (!summed) {
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            stat_add(s[0], static_cast<double>(h[i][j]));  // out-of-range slots hold zeros
          }
        }
      }
      row_allreduce(s, red);
      mean = stat_mean(s[0], p.len);
    }
    // The squared deviations from the mean; float64: the deviations from its rounded value
    // kept exactly (stat_add_dev) and summed too, so that the moments come out as
    // double-doubles.
    const Normalizer<A> norm = [&] {
      if constexpr (kF64) {
        constexpr int K = RMS ? 1 : 2;
        S d[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
          stat_zero(d[k]);
        }
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          if (static_cast<int64_t>(i) * tpr + tid < row_vecs) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              stat_add_dev(d, static_cast<double>(h[i][j]), mean);
            }
          }
        }
        row_allreduce(d, red);
        return make_normalizer(dd_moments(d, p.len, mean), p.eps);
      } else {
        stat_zero(s[0]);
        bool summed = false;
        if constexpr (kFloatPartials<H>) {
          float q = 0.0f;
          // d = h - mean with the mean as float plus its rounding error (Normalizer<float>)
          const float mean_hi = static_cast<float>(mean);
          const float mean_lo = static_cast<float>(mean - static_cast<double>(mean_hi));
#pragma unroll
          for (int i = 0; i < VPT; ++i) {
            if (static_cast<int64_t>(i) * tpr + tid < row_vecs) {
#pragma unroll
              for (int j = 0; j < VEC; ++j) {
                const float d = sub_rn(sub_rn(h[i][j], mean_hi), mean_lo);
                q = fma_rn(d, d, q);
              }
            }
          }
          summed = float_squares_ok(q);
          s[0] = summed ? static_cast<double>(q) : 0.0;
        }
        if (!summed) {
#pragma unroll
          for (int i = 0; i < VPT; ++i) {
            if (static_cast<int64_t>(i) * tpr + tid < row_vecs) {
#pragma unroll
              for (int j = 0; j < VEC; ++j) {
                const double d = static_cast<double>(h[i][j]) - mean;
                stat_add_prod(s[0], d, d);
              }
            }
          }
        }
        row_allreduce(s, red);
        return make_normalizer(mean, stat_mean(s[0], p.len), p.eps);
      }
    }();
    if (row_vecs > 0 && tid == 0) {
      if constexpr (!RMS) {
        p.mean[row] = norm.stored_mean();
      }
      p.rstd[row] = norm.stored_rstd();
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t vi = static_cast<int64_t>(i) * tpr + tid;
      if (vi < row_vecs) {
        A hv[VEC];
        h[i].get(hv);
        normalize_store<VEC>(p, row_off + vi * VEC, vi * VEC, hv, norm);
      }
    }
  }
}

// Forward, looping path (any N): one sweep over the row sums d = h - shift and d * d in
// double / double-double (shift = h of the row's first element, read by every thread; for
// RMSNorm shift = 0; stat_add_dev: float64 d kept exactly), so the variance sum(d^2) / N -
// (sum(d) / N)^2 loses nothing to the shift; a second sweep recomputes h and writes out
// (and h).
template <typename T, typename R, typename H, typename W, bool RMS, int VEC>
__global__ void __launch_bounds__(kLoopMaxThreads, 1)
    norm_fwd_looping_kernel(const FwdParams<T, R, H, W> p) {
  using A = at::opmath_type<T>;
  using S = stat_t<A>;
  constexpr int K = RMS ? 1 : 2;
  constexpr int U = kLoopUnroll<A, VEC>;
  __shared__ S red[kMaxWarps * K];
  const int64_t tpr = blockDim.x;
  const int tid = threadIdx.x;
  const int64_t nvec = p.N / VEC;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < p.M;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const int64_t row_vecs = row < p.M ? nvec : 0;
    const int64_t row_off = row * p.N;
    double shift = 0.0;
    if constexpr (!RMS) {
      if (row_vecs > 0) {
        HSlot<H, A, 1> h0[1];
        load_h_vectors<1>(p, row_off, 0, 0, 1, h0);
        shift = static_cast<double>(h0[0][0]);
        // (an infinite first element: no shift, so that the mean is the plain sum's, +-inf
        // or NaN as the CPU's, not inf - inf)
        shift = isfinite(shift) ? shift : 0.0;
      }
    }
    S sums[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      stat_zero(sums[k]);
    }
    for (int64_t base = tid; base < row_vecs; base += tpr * U) {
      HSlot<H, A, VEC> h[U];
      load_h_vectors<VEC>(p, row_off, base, tpr, row_vecs, h);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (base + u * tpr < row_vecs) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            stat_add_dev(sums, static_cast<double>(h[u][j]), shift);
          }
        }
      }
    }
    row_allreduce(sums, red);
    const Normalizer<A> norm = [&] {
      if constexpr (std::is_same_v<A, double>) {
        return make_normalizer(dd_moments(sums, p.len, shift), p.eps);
      } else {
        double mean = 0.0;
        double var;
        if constexpr (RMS) {
          var = stat_mean(sums[0], p.len);
        } else {
          shifted_moments(sums[0], sums[1], p.len, shift, mean, var);
        }
        return make_normalizer(mean, var, p.eps);
      }
    }();
    if (row_vecs > 0 && tid == 0) {
      if constexpr (!RMS) {
        p.mean[row] = norm.stored_mean();
      }
      p.rstd[row] = norm.stored_rstd();
    }
    for (int64_t base = tid; base < row_vecs; base += tpr * U) {
      HSlot<H, A, VEC> h[U];
      load_h_vectors<VEC>(p, row_off, base, tpr, row_vecs, h);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t vi = base + u * tpr;
        if (vi < row_vecs) {
          if (p.h_out != nullptr) {
            h[u].store(p.h_out + row_off + vi * VEC);
          }
          A hv[VEC];
          h[u].get(hv);
          normalize_store<VEC>(p, row_off + vi * VEC, vi * VEC, hv, norm);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward helpers.

// g = dy * gamma for VEC elements (dy when there is no gamma), each product rounded once:
// the row sums and grad_h must see the same g (a product fused into g - mean(g) by the
// compiler would leave its rounding error in grad_h, e.g. for one-element rows, where
// g - mean(g) is exactly 0).
template <int VEC, typename W, typename A>
__device__ __forceinline__ void times_gamma(const W* gamma, int64_t col, const A (&dy)[VEC],
                                            A (&g)[VEC]) {
  if (gamma != nullptr) {
    load_vec<VEC>(gamma + col, g);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      g[j] = mul_rn(g[j], dy[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      g[j] = dy[j];
    }
  }
}

// xhat = (y - beta) / gamma for VEC elements of the output y, given in xhat (the backward
// from the output; gamma has no zeros).
template <int VEC, typename W, typename A>
__device__ __forceinline__ void xhat_of_output(const W* gamma, const W* beta, int64_t col,
                                               A (&xhat)[VEC]) {
  A b[VEC];
  A gm[VEC];
  load_or_fill<VEC>(gamma, col, A(1), gm);
  load_or_fill<VEC>(beta, col, A(0), b);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    xhat[j] = div_rn(sub_rn(xhat[j], b[j]), gm[j]);
  }
}

template <int VEC, typename T, typename W, typename A>
__device__ __forceinline__ void xhat_from_output(const T* y, const W* gamma, const W* beta,
                                                 int64_t col, A (&xhat)[VEC]) {
  load_vec<VEC>(y, xhat);
  xhat_of_output<VEC>(gamma, beta, col, xhat);
}

// The 16-bit backward's inputs of VEC elements as loaded (bwd_load_raw): dy, and h or (from
// the output) y in hy's first bytes. Loaded ahead of their use, so that a thread's loads are
// in flight together (the register path loads the next row's while it finishes a row).
template <typename T, typename H, int VEC>
struct BwdRaw {
  using HY = std::conditional_t<(sizeof(H) > sizeof(T)), H, T>;
  RawVec<T, VEC> dy;
  RawVec<HY, VEC> hy;
};

template <int VEC, typename T, typename H, typename W>
__device__ __forceinline__ void bwd_load_raw(const BwdParams<T, H, W>& p, int64_t off,
                                             BwdRaw<T, H, VEC>& r) {
  load_raw(p.dy + off, r.dy);
  if (p.y != nullptr) {
    RawVec<T, VEC> y;
    load_raw(p.y + off, y);
    memcpy(&r.hy, &y, sizeof(y));
  } else {
    RawVec<H, VEC> h;
    load_raw(p.h + off, h);
    memcpy(&r.hy, &h, sizeof(h));
  }
}

// dy and xhat = (h - mean) * rstd (from the output: (y - beta) / gamma) for VEC elements of
// bfloat16 / float16 data, from their loaded bytes; adds g = dy * gamma to the row sums in
// double (sums[K-1] += g * xhat, exact there, and sums[0] += g for LayerNorm). With a 16-bit
// h the VEC terms are summed in float, then added in double (kFloatPartials), each term in
// double where their float sum is not finite.
// xhat = (h - mean) * rstd of a 16-bit row's element, in float. For rows of values near
// float's largest (rstd below 2^-100), whose h - mean can leave float's range, h and mean
// are halved first, exact there, and rstd doubled (Normalizer<float>'s pin).
struct HalfRowXhat {
  float pin, mean, rstd;
  __device__ __forceinline__ HalfRowXhat(float m, float r) {
    const bool big = r < 0x1p-100f;
    pin = big ? 0.5f : 1.0f;
    mean = mul_rn(m, pin);
    rstd = big ? mul_rn(r, 2.0f) : r;
  }
  __device__ __forceinline__ float operator()(float h) const {
    return mul_rn(sub_rn(mul_rn(h, pin), mean), rstd);
  }
};

template <bool RMS, int VEC, typename T, typename H, typename W, int K>
__device__ __forceinline__ void bwd_terms(const BwdParams<T, H, W>& p, const BwdRaw<T, H, VEC>& r,
                                          int64_t col, float mean, float rstd, float (&dy)[VEC],
                                          float (&xhat)[VEC], double (&sums)[K]) {
  static_assert(kHalfData<T>, "bwd_terms: bfloat16 / float16 data");
  unpack_raw<VEC>(r.dy, dy);
  const bool from_output = p.y != nullptr;
  if (from_output) {
    RawVec<T, VEC> y;
    memcpy(&y, &r.hy, sizeof(y));
    unpack_raw<VEC>(y, xhat);
    xhat_of_output<VEC>(p.gamma, p.beta, col, xhat);
  } else {
    RawVec<H, VEC> h;
    memcpy(&h, &r.hy, sizeof(h));
    unpack_raw<VEC>(h, xhat);
  }
  float g[VEC];
  times_gamma<VEC>(p.gamma, col, dy, g);
  float gx = 0.0f;
  float gs = 0.0f;
  const HalfRowXhat of_h(mean, rstd);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (!from_output) xhat[j] = of_h(xhat[j]);
    if constexpr (kFloatPartials<H>) {
      gx = fma_rn(g[j], xhat[j], gx);
      gs += g[j];
    }
  }
  if (kFloatPartials<H> && float_sum_ok(gx) && (RMS || float_sum_ok(gs))) {
    sums[K - 1] += static_cast<double>(gx);
    if constexpr (!RMS) {
      sums[0] += static_cast<double>(gs);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      stat_add_prod(sums[K - 1], static_cast<double>(g[j]), static_cast<double>(xhat[j]));
      if constexpr (!RMS) {
        stat_add(sums[0], static_cast<double>(g[j]));
      }
    }
  }
}

// bwd_terms for NV vectors of a row, vector i at vector index first + i * stride where it is
// below row_vecs (zeros elsewhere), with every load issued before any is used.
template <bool RMS, int VEC, int NV, typename T, typename H, typename W, int K>
__device__ __forceinline__ void bwd_load_terms(const BwdParams<T, H, W>& p, int64_t row_off,
                                               int64_t first, int64_t stride, int64_t row_vecs,
                                               float mean, float rstd, float (&dy)[NV][VEC],
                                               float (&xhat)[NV][VEC], double (&sums)[K]) {
  BwdRaw<T, H, VEC> in[NV] = {};
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int64_t vi = first + i * stride;
    if (vi < row_vecs) {
      bwd_load_raw<VEC>(p, row_off + vi * VEC, in[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int64_t vi = first + i * stride;
    if (vi < row_vecs) {
      bwd_terms<RMS, VEC>(p, in[i], vi * VEC, mean, rstd, dy[i], xhat[i], sums);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        dy[i][j] = 0.0f;
        xhat[i][j] = 0.0f;
      }
    }
  }
}

// The 16-bit backward's row constants for grad_h = rstd * (g - c_g - xhat * c_gx): c_gx =
// mean(g * xhat) and c_g = mean(g) (0 for RMSNorm) from the row sums. RMSNorm rows of one
// element: g - xhat * g * xhat = g * (1 - xhat^2) cancels almost to nothing, and xhat's
// rounding left up to twice torch's error in it; with the forward's eps, 1 - xhat^2 =
// eps * rstd^2, so grad_h = g * eps * rstd^3, taken as the row's rstd with c_gx = 0.
template <bool RMS, int K, typename T, typename H, typename W>
__device__ __forceinline__ void bwd_row_constants(const BwdParams<T, H, W>& p,
                                                  const double (&sums)[K], float& rstd,
                                                  float& c_g, float& c_gx) {
  c_gx = static_cast<float>(stat_mean(sums[K - 1], p.len));
  c_g = RMS ? 0.0f : static_cast<float>(stat_mean(sums[0], p.len));
  if (RMS && p.N == 1 && p.eps_given) {
    const double r = rstd;
    rstd = static_cast<float>(p.eps * r * r * r);
    c_gx = 0.0f;
  }
}

// grad_h = rstd * (g - c_g - xhat * c_gx) (+ grad_residual_out) for VEC elements.
template <int VEC, typename T, typename H, typename W, typename A>
__device__ __forceinline__ void bwd_store(const BwdParams<T, H, W>& p, int64_t off, int64_t col,
                                          A rstd, A c_g, A c_gx, const A (&dy)[VEC],
                                          const A (&xhat)[VEC]) {
  A dx[VEC];
  times_gamma<VEC>(p.gamma, col, dy, dx);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    dx[j] = rstd * fma_rn(-xhat[j], c_gx, sub_rn(dx[j], c_g));
  }
  if (p.dres != nullptr) {
    A r[VEC];
    load_vec<VEC>(p.dres + off, r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dx[j] += r[j];
    }
  }
  store_grads<VEC>(p, off, dx);
}

// The wide backward, float32 data: as the CPU kernels, in double, grad_h rounded once.
// d = h - shift (shift: the saved mean; RMSNorm 0), or from the output d = xhat =
// (y - beta) / gamma (in float, as above; the CPU multiplies by 1 / gamma, which can differ by
// an ulp); g = dy * gamma, exact in double. One sweep sums g,
// g * d, d and d * d (RMSNorm: no g, d); with own_stats, mean = shift + sum(d) / N and var =
// sum(d^2) / N - (sum(d) / N)^2 are the statistics of h itself to double precision (the
// saved float32 ones would carry their rounding error into every gradient; the shift, within
// an ulp of the mean, costs the subtraction nothing), and sum(g * xhat) = rstd * (sum(g * d)
// - (mean - shift) * sum(g)). Without own_stats, mean and rstd are the saved ones.
// The sums (here and in the float64 backward): [0] g * d, [1] d * d, and for LayerNorm
// [2] g, [3] d.
template <bool RMS>
constexpr int kPreciseSums = RMS ? 2 : 4;

// The backward kernels that take this path: float32 data, and bfloat16/float16 data with a
// float32 h (a float32 residual, or residual_in_fp32), whose saved float32 mean, rounded,
// would enter every xhat (the statistics of h itself instead, as the CPU takes them).
template <typename T, typename H>
constexpr bool kWideBwd = std::is_same_v<T, float> || (kHalfData<T> && std::is_same_v<H, float>);

// dy and v (h, or xhat from the output) for VEC elements (also for the float64 backward).
template <int VEC, typename T, typename H, typename W, typename A>
__device__ __forceinline__ void wide_load(const BwdParams<T, H, W>& p, int64_t off,
                                          int64_t col, A (&dy)[VEC], A (&v)[VEC]) {
  load_vec<VEC>(p.dy + off, dy);
  if (p.y != nullptr) {
    xhat_from_output<VEC>(p.y + off, p.gamma, p.beta, col, v);
  } else {
    load_vec<VEC>(p.h + off, v);
  }
}

// Adds VEC elements' terms to the sums.
template <bool RMS, int VEC, typename T, typename H, typename W>
__device__ __forceinline__ void wide_sums(const BwdParams<T, H, W>& p, int64_t col,
                                          double shift, const float (&dy)[VEC],
                                          const float (&v)[VEC],
                                          double (&sums)[kPreciseSums<RMS>]) {
  float gm[VEC];
  load_or_fill<VEC>(p.gamma, col, 1.0f, gm);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const double g = static_cast<double>(dy[j]) * static_cast<double>(gm[j]);
    const double d = static_cast<double>(v[j]) - shift;
    sums[0] = fma(g, d, sums[0]);
    if (p.own_stats) {
      sums[1] = fma(d, d, sums[1]);
    }
    if constexpr (!RMS) {
      sums[2] += g;
      if (p.own_stats) {
        sums[3] += d;
      }
    }
  }
}

// A row's constants after the sums: xhat = (v - shift) * xs + x_off (from h: xs = rstd,
// with own_stats x_off = -(mean - shift) * rstd, else 0; from the output xs = 1, x_off = 0),
// grad_h = (g - c1) * rstd + xhat * b (c1 = mean(g), b = -rstd * mean(g * xhat)). (xs is
// not kept: the register path's backward has few registers to spare.)
struct WideRow {
  float shift;
  double rstd, x_off, c1, b;
};

template <typename T, typename H, typename W>
__device__ __forceinline__ double wide_xs(const BwdParams<T, H, W>& p, const WideRow& w) {
  return p.y != nullptr ? 1.0 : w.rstd;
}

template <bool RMS, typename T, typename H, typename W>
__device__ __forceinline__ WideRow wide_row(const BwdParams<T, H, W>& p, float shift,
                                            double saved_rstd,
                                            const double (&sums)[kPreciseSums<RMS>]) {
  WideRow w;
  w.shift = shift;
  w.rstd = saved_rstd;
  w.c1 = 0.0;
  double delta = 0.0;  // mean - shift
  double sum_gd = sums[0];  // sum(g * (h - mean)), from the output sum(g * xhat)
  if constexpr (!RMS) {
    w.c1 = stat_mean(sums[2], p.len);
    if (p.own_stats) {
      delta = stat_mean(sums[3], p.len);
    }
    sum_gd = fma(-delta, sums[2], sums[0]);  // (also with delta = 0: an infinite sum(g) gives
                                             // NaN, as on the CPU)
  }
  if (p.own_stats) {
    const double var = fma(-delta, delta, stat_mean(sums[1], p.len));
    w.rstd = rstd_of(var < 0.0 ? 0.0 : var, p.eps);
  }
  const double xs = wide_xs(p, w);
  w.x_off = -delta * xs;
  w.b = -w.rstd * (xs * stat_mean(sum_gd, p.len));
  return w;
}

// grad_h for VEC elements (+ grad_residual_out), rounded once; gx: dy * xhat, the terms of
// the weight gradient (double for float32 data; float for 16-bit data with a float32 h).
template <int VEC, typename T, typename H, typename W, typename G>
__device__ __forceinline__ void wide_store(const BwdParams<T, H, W>& p, int64_t off,
                                           int64_t col, const WideRow& w, const float (&dy)[VEC],
                                           const float (&v)[VEC], G (&gx)[VEC]) {
  float gm[VEC];
  load_or_fill<VEC>(p.gamma, col, 1.0f, gm);
  float r[VEC];
  load_or_fill<VEC>(p.dres, off, 0.0f, r);
  float dx[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const double xh = fma(static_cast<double>(v[j]) - w.shift, wide_xs(p, w), w.x_off);
    const double g = static_cast<double>(dy[j]) * static_cast<double>(gm[j]);
    dx[j] = static_cast<float>(fma(g - w.c1, w.rstd, fma(xh, w.b, static_cast<double>(r[j]))));
    gx[j] = static_cast<G>(static_cast<double>(dy[j]) * xh);  // (part_t: float32 data's double)
  }
  store_grads<VEC>(p, off, dx);
}

// The float64 backward: as the CPU kernels, in double-double. d = h - shift exactly (dh + dl,
// TwoSum; shift: the saved mean, RMSNorm 0; from the output d = xhat = (y - beta) / gamma),
// g = dy * gamma exactly (g + g_lo, TwoProd); one sweep sums g * d, d * d, g and d as
// double-doubles; with own_stats the statistics of h itself as double-doubles (mean = shift +
// mean(d)); xhat, the bracket g - mean(g) - xhat * mean(g * xhat) and grad_h to about one
// rounding. The sums as kPreciseSums.

template <bool RMS, int VEC, typename T, typename H, typename W>
__device__ __forceinline__ void f64_sums(const BwdParams<T, H, W>& p, int64_t col, double shift,
                                         const double (&dy)[VEC], const double (&v)[VEC],
                                         DoubleDouble (&sums)[kPreciseSums<RMS>]) {
  double gm[VEC];
  load_or_fill<VEC>(p.gamma, col, 1.0, gm);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const double g = mul_rn(dy[j], gm[j]);
    const double g_lo = fma_rn(dy[j], gm[j], -g);
    double dh, dl;
    two_sum(v[j], -shift, dh, dl);
    const bool finite = isfinite(g) && isfinite(dh);  // (else no error terms: NaN)
    stat_add_prod(sums[0], g, dh);
    if (finite) sums[0].lo += fma_rn(g, dl, mul_rn(g_lo, dh));
    if (p.own_stats) {
      stat_add_prod(sums[1], dh, dh);
      if (finite) sums[1].lo += 2.0 * dh * dl;
    }
    if constexpr (!RMS) {
      stat_add(sums[2], g);
      if (finite) sums[2].lo += g_lo;
      if (p.own_stats) {
        stat_add(sums[3], dh);
        if (finite) sums[3].lo += dl;
      }
    }
  }
}

// s / n as q + q_lo, q the double nearest to it (s normalized first: its parts may overlap).
__device__ __forceinline__ void dd_div_n(const DoubleDouble& s, const RowLength& len, double& q,
                                         double& q_lo) {
  double hi = s.hi, lo = s.lo;
  if (isfinite(hi)) two_sum(s.hi, s.lo, hi, lo);
  q = stat_mean(hi, len);
  q_lo = isfinite(q) ? (fma_rn(-q, len.n, hi) + lo) * len.inv_n : 0.0;
}

// A row's constants: xhat = ((v - shift) - mean_lo) * rx (rx = rstd, from the output 1),
// grad_h = rstd * (g - c1 - xhat * c2), each constant a double-double (value hi + lo).
struct F64Row {
  double shift, mean_lo, rstd, rstd_lo, c1, c1_lo, c2, c2_lo;
};

template <typename T, typename H, typename W>
__device__ __forceinline__ void f64_rx(const BwdParams<T, H, W>& p, const F64Row& w, double& rx,
                                       double& rx_lo) {
  rx = p.y != nullptr ? 1.0 : w.rstd;
  rx_lo = p.y != nullptr ? 0.0 : w.rstd_lo;
}

template <bool RMS, typename T, typename H, typename W>
__device__ __forceinline__ F64Row f64_row(const BwdParams<T, H, W>& p, double shift,
                                          double saved_rstd,
                                          const DoubleDouble (&sums)[kPreciseSums<RMS>]) {
  F64Row w{shift, 0.0, saved_rstd, 0.0, 0.0, 0.0, 0.0, 0.0};
  double delta = 0.0;  // mean - shift
  if (p.own_stats) {
    DdMoments m;
    if constexpr (RMS) {
      const DoubleDouble mom[1] = {sums[1]};
      m = dd_moments(mom, p.len, 0.0);
    } else {
      const DoubleDouble mom[2] = {sums[3], sums[1]};
      m = dd_moments(mom, p.len, 0.0);
    }
    delta = m.mean_hi;
    w.mean_lo = m.mean_hi + m.mean_lo;
    dd_rstd(m.var_hi, m.var_lo, p.eps, w.rstd, w.rstd_lo);
  }
  DoubleDouble gx = sums[0];  // sum(g * (h - mean)), from the output sum(g * xhat)
  if constexpr (!RMS) {
    dd_div_n(sums[2], p.len, w.c1, w.c1_lo);
    // gx -= delta * sum(g) (with delta = 0 too: an infinite sum(g) gives NaN, as on the CPU)
    const double q = mul_rn(-delta, sums[2].hi);
    const double qe = fma_rn(-delta, sums[2].hi, -q);
    stat_add(gx, q);
    if (isfinite(gx.hi)) gx.lo += fma_rn(-delta, sums[2].lo, qe);
  }
  double rx, rx_lo;
  f64_rx(p, w, rx, rx_lo);
  // c2 = gx * rx / n
  DoubleDouble gr;
  gr.hi = mul_rn(gx.hi, rx);
  gr.lo = isfinite(gr.hi) ? fma_rn(gx.hi, rx, -gr.hi) + (gx.hi * rx_lo + gx.lo * rx) : 0.0;
  dd_div_n(gr, p.len, w.c2, w.c2_lo);
  return w;
}

// grad_h for VEC elements (+ grad_residual_out), rounded once; gx: dy * xhat, the terms of
// the weight gradient.
template <int VEC, typename T, typename H, typename W>
__device__ __forceinline__ void f64_store(const BwdParams<T, H, W>& p, int64_t off, int64_t col,
                                          const F64Row& w, const double (&dy)[VEC],
                                          const double (&v)[VEC], double (&gx)[VEC]) {
  double gm[VEC];
  load_or_fill<VEC>(p.gamma, col, 1.0, gm);
  double r[VEC];
  load_or_fill<VEC>(p.dres, off, 0.0, r);
  double rx, rx_lo;
  f64_rx(p, w, rx, rx_lo);
  double dx[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const double g = mul_rn(dy[j], gm[j]);
    const double g_lo = fma_rn(dy[j], gm[j], -g);
    // xhat = xp + xe
    double dh, dl;
    two_sum(v[j], -w.shift, dh, dl);
    dl = sub_rn(dl, w.mean_lo);
    const double xp = mul_rn(dh, rx);
    const double xe = fma_rn(dh, rx, -xp) + fma_rn(dh, rx_lo, mul_rn(dl, rx));
    // the bracket b + b_lo = (g - c1) - xhat * c2
    double a, ae;
    two_sum(g, -w.c1, a, ae);
    ae += g_lo - w.c1_lo;
    const double m = mul_rn(xp, w.c2);
    const double me = fma_rn(xp, w.c2, -m) + fma_rn(xp, w.c2_lo, mul_rn(xe, w.c2));
    double b, be;
    two_sum(a, -m, b, be);
    const double b_lo = be + (ae - me);
    // rstd * b as a double-double, r[j] (the gradient of the returned h, which may be the
    // larger term) added to it exactly, then the low parts: rounded once (as the CPU's)
    const double p0 = mul_rn(w.rstd, b);
    double q, qe;
    two_sum(p0, r[j], q, qe);
    const double lo = qe + fma_rn(w.rstd, b_lo, fma_rn(w.rstd_lo, b, fma_rn(w.rstd, b, -p0)));
    dx[j] = isfinite(q) ? q + lo : q;
    gx[j] = fma_rn(dy[j], xp, mul_rn(dy[j], xe));
  }
  store_grads<VEC>(p, off, dx);
}

// The float32 (wide) and float64 backward's steps, by the data's type.
template <bool RMS, int VEC, typename T, typename H, typename W, typename A, typename S, int K>
__device__ __forceinline__ void precise_sums(const BwdParams<T, H, W>& p, int64_t col,
                                             double shift, const A (&dy)[VEC],
                                             const A (&v)[VEC], S (&sums)[K]) {
  if constexpr (kWideBwd<T, H>) {
    wide_sums<RMS, VEC>(p, col, shift, dy, v, sums);
  } else {
    f64_sums<RMS, VEC>(p, col, shift, dy, v, sums);
  }
}
template <bool RMS, typename T, typename H, typename W, typename A, typename S, int K>
__device__ __forceinline__ auto precise_row(const BwdParams<T, H, W>& p, A shift, A saved_rstd,
                                            const S (&sums)[K]) {
  if constexpr (kWideBwd<T, H>) {
    return wide_row<RMS>(p, shift, saved_rstd, sums);
  } else {
    return f64_row<RMS>(p, shift, saved_rstd, sums);
  }
}
template <int VEC, typename T, typename H, typename W, typename R, typename A>
__device__ __forceinline__ void precise_store(const BwdParams<T, H, W>& p, int64_t off,
                                              int64_t col, const R& w, const A (&dy)[VEC],
                                              const A (&v)[VEC], part_t<T> (&gx)[VEC]) {
  if constexpr (kWideBwd<T, H>) {
    wide_store<VEC>(p, off, col, w, dy, v, gx);
  } else {
    f64_store<VEC>(p, off, col, w, dy, v, gx);
  }
}

// Backward, register path: one pass over each row for grad_h; the thread's columns of
// dy * xhat and dy accumulate in registers over the rows its row slot visits in a chunk,
// then one partial row per chunk is written (row slots summed in shared memory in a fixed
// order).
// Dynamic shared memory: blockDim.y * blockDim.x * VPT * VEC elements of part_t<T> (at most
// 32 KiB: blockDim.y > 1 only below 512 threads per row) when blockDim.y > 1 and a weight
// gradient is wanted.
template <typename T, typename H, typename W, bool RMS, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxThreads)
    norm_bwd_register_kernel(const BwdParams<T, H, W> p) {
  using A = at::opmath_type<T>;
  using S = stat_t<A>;
  constexpr bool kWide = kWideBwd<T, H>;  // the wide backward (above)
  constexpr bool kF64 = std::is_same_v<T, double>;  // the float64 backward (above)
  constexpr int K = (kWide || kF64) ? kPreciseSums<RMS> : RMS ? 1 : 2;
  constexpr int E = VPT * VEC;
  __shared__ S red[kMaxWarps * K];
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  const int tpr = blockDim.x;
  const int tid = threadIdx.x;
  const int64_t nvec = p.N / VEC;
  const bool want_gamma = p.part_gamma != nullptr;
  const bool want_beta = p.part_beta != nullptr;
  // Chunks of p.chunk_rows rows (a multiple of blockDim.y), each CTA taking whole chunks
  // (blockIdx.x, blockIdx.x + gridDim.x, ...): a chunk's partial row sums its rows in the
  // same order whichever CTA takes it, so the weight gradients do not depend on the grid
  // size (nor on the GPU).
  // dy * xhat in part_t (double for float32 data: the wide backward's products, kept in
  // double, add without a float32 rounding, as the partials do, so a column's gradient is
  // its sum rounded once); dy in A (float32 values: exact until two rows add).
  using P = part_t<T>;
  P acc_gamma[VPT][VEC];
  A acc_beta[VPT][VEC];
  // float64: the accumulators' rounding errors (double-double sums, as the looping path's
  // partials and the CPU take them: plain double sums over a chunk's rows were up to 8x
  // torch's error for rows of a few elements); unused otherwise.
  P acc_gamma_lo[VPT][VEC];
  A acc_beta_lo[VPT][VEC];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_gamma[i][j] = P(0);
      acc_beta[i][j] = A(0);
      acc_gamma_lo[i][j] = P(0);
      acc_beta_lo[i][j] = A(0);
    }
  }
  // 16-bit data and h: a row's dy and h (or y), mean and rstd are loaded a row ahead, so that
  // they are in flight while the CTA reduces and stores the row before (at N = 8192 one CTA
  // of 1024 threads fills an SM's registers: nothing else would be in flight then). (A
  // float32 h's bytes would spill; it loads the row's vectors together, at the row's start.)
  // (ADDNORM_CUDA_BWD_AHEAD=0, CMake's option: at the row's start, as with a float32 h.)
  constexpr bool kAhead = ADDNORM_CUDA_BWD_AHEAD && kHalfData<T> && sizeof(H) == sizeof(T);
  BwdRaw<T, H, VEC> ahead[VPT] = {};
  A ahead_mean = A(0);
  A ahead_rstd = A(0);
  const auto fetch = [&](int64_t r0) {  // the inputs of row group r0 (nothing past M)
    const int64_t r = r0 + threadIdx.y;
    const bool ok = r < p.M;
    ahead_mean = (RMS || !ok || p.mean == nullptr) ? A(0) : __ldg(p.mean + r);
    ahead_rstd = ok ? __ldg(p.rstd + r) : A(0);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t vi = static_cast<int64_t>(i) * tpr + tid;
      if (ok && vi < nvec) {
        bwd_load_raw<VEC>(p, r * p.N + vi * VEC, ahead[i]);
      }
    }
  };
  // The row group after r0 in the CTA's walk: the next of chunk c, else the first of the
  // CTA's next chunk (as the loop below advances).
  const auto next_group = [&](int64_t r0, int c) {
    r0 += blockDim.y;
    return r0 < p.M && r0 < static_cast<int64_t>(c + 1) * p.chunk_rows
               ? r0
               : static_cast<int64_t>(c + static_cast<int>(gridDim.x)) * p.chunk_rows;
  };
  int chunk = blockIdx.x;
  if constexpr (kAhead) {
    fetch(static_cast<int64_t>(chunk) * p.chunk_rows);
  }
  for (int64_t row0 = static_cast<int64_t>(chunk) * p.chunk_rows; row0 < p.M;) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < p.M;
    const int64_t row_vecs = valid ? nvec : 0;
    const int64_t row_off = row * p.N;
    const A mean = kAhead ? ahead_mean
                          : (RMS || !valid || p.mean == nullptr) ? A(0) : p.mean[row];
    const A rstd = kAhead ? ahead_rstd : valid ? p.rstd[row] : A(0);
    A dy[VPT][VEC];
    A xhat[VPT][VEC];  // the wide backward: h, or xhat from the output
    S sums[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      stat_zero(sums[k]);
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t vi = static_cast<int64_t>(i) * tpr + tid;
      if (vi >= row_vecs) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          dy[i][j] = A(0);
          xhat[i][j] = A(0);
        }
      } else if constexpr (kWide || kF64) {
        wide_load<VEC>(p, row_off + vi * VEC, vi * VEC, dy[i], xhat[i]);
      } else if constexpr (kAhead) {
        bwd_terms<RMS, VEC>(p, ahead[i], vi * VEC, mean, rstd, dy[i], xhat[i], sums);
      }
    }
    if constexpr (kWide || kF64) {  // (every vector's loads issued above, then the sums)
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if (static_cast<int64_t>(i) * tpr + tid < row_vecs) {
          precise_sums<RMS, VEC>(p, (static_cast<int64_t>(i) * tpr + tid) * VEC, mean, dy[i],
                                 xhat[i], sums);
        }
      }
    } else if constexpr (kAhead) {
      fetch(next_group(row0, chunk));
    } else {
      bwd_load_terms<RMS, VEC, VPT>(p, row_off, tid, tpr, row_vecs, mean, rstd, dy, xhat, sums);
    }
    row_allreduce(sums, red);
    if constexpr (kWide || kF64) {
      const auto w = precise_row<RMS>(p, mean, rstd, sums);
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int64_t vi = static_cast<int64_t>(i) * tpr + tid;
        if (vi < row_vecs) {
          P gx[VEC];
          precise_store<VEC>(p, row_off + vi * VEC, vi * VEC, w, dy[i], xhat[i], gx);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            if constexpr (kF64) {
              dd_accumulate(acc_gamma[i][j], acc_gamma_lo[i][j], gx[j]);
              dd_accumulate(acc_beta[i][j], acc_beta_lo[i][j], dy[i][j]);
            } else {
              acc_gamma[i][j] += gx[j];
              acc_beta[i][j] += dy[i][j];
            }
          }
        }
      }
    } else {
      A row_rstd = rstd;
      A c_g, c_gx;
      bwd_row_constants<RMS>(p, sums, row_rstd, c_g, c_gx);
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int64_t vi = static_cast<int64_t>(i) * tpr + tid;
        if (vi < row_vecs) {
          bwd_store<VEC>(p, row_off + vi * VEC, vi * VEC, row_rstd, c_g, c_gx, dy[i], xhat[i]);
        }
      }
      // Out-of-range slots hold zeros, so they add nothing.
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_gamma[i][j] += dy[i][j] * xhat[i][j];
          acc_beta[i][j] += dy[i][j];
        }
      }
    }
    row0 += blockDim.y;
    if (row0 < p.M && row0 < static_cast<int64_t>(chunk + 1) * p.chunk_rows) {
      continue;
    }
    // The chunk is done: its partial row, then the CTA's next chunk.
    const int64_t part_off = static_cast<int64_t>(chunk) * p.N;
    chunk += gridDim.x;
    row0 = static_cast<int64_t>(chunk) * p.chunk_rows;
    if (!want_gamma && !want_beta) {
      continue;
    }
    if constexpr (kF64) {  // (each slot's double-double rounded once)
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_gamma[i][j] += acc_gamma_lo[i][j];
          acc_beta[i][j] += acc_beta_lo[i][j];
          acc_gamma_lo[i][j] = P(0);
          acc_beta_lo[i][j] = A(0);
        }
      }
    }
    if (blockDim.y == 1) {
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int64_t vi = static_cast<int64_t>(i) * tpr + tid;
        if (vi < nvec) {
          if (want_gamma) {
            store_vec<VEC>(p.part_gamma + part_off + vi * VEC, acc_gamma[i]);
          }
          if (want_beta) {
            store_vec<VEC>(p.part_beta + part_off + vi * VEC, acc_beta[i]);
          }
        }
      }
    } else {
      // Several rows per CTA: sum the row slots' accumulators in shared memory, y = 0, 1,
      // ... in order for each value, one accumulator (gamma, then beta) at a time, with all
      // threads of the CTA sharing the values.
      const int rows = blockDim.y;
      P* buf = reinterpret_cast<P*>(dyn_smem);  // [rows][E][tpr]
#pragma unroll
      for (int which = 0; which < 2; ++which) {
        P* part = which == 0 ? p.part_gamma : p.part_beta;
        if (part == nullptr) {  // (uniform)
          continue;
        }
        __syncthreads();  // the previous readers are done with buf
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            buf[(threadIdx.y * E + i * VEC + j) * tpr + tid] =
                which == 0 ? acc_gamma[i][j] : static_cast<P>(acc_beta[i][j]);
          }
        }
        __syncthreads();
        for (int v = threadIdx.y * tpr + tid; v < E * tpr; v += rows * tpr) {
          const int k = v / tpr;  // which value of the thread
          const int t = v % tpr;  // of which thread of the row
          P sum = buf[k * tpr + t];
          P sum_lo = P(0);  // (float64: a double-double sum, as above)
          for (int y = 1; y < rows; ++y) {
            if constexpr (kF64) {
              dd_accumulate(sum, sum_lo, buf[(y * E + k) * tpr + t]);
            } else {
              sum += buf[(y * E + k) * tpr + t];
            }
          }
          sum += sum_lo;
          const int64_t vi = static_cast<int64_t>(k / VEC) * tpr + t;
          if (vi < nvec) {
            part[part_off + vi * VEC + k % VEC] = sum;
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc_gamma[i][j] = P(0);
        acc_beta[i][j] = A(0);
      }
    }
  }
}

// Backward, looping path (any N): row sums in a first sweep, grad_h in a second. The
// weight gradients come from norm_bwd_weight_partials_kernel.
template <typename T, typename H, typename W, bool RMS, int VEC>
__global__ void __launch_bounds__(kLoopMaxThreads, 1)
    norm_bwd_looping_kernel(const BwdParams<T, H, W> p) {
  using A = at::opmath_type<T>;
  using S = stat_t<A>;
  constexpr bool kWide = kWideBwd<T, H>;  // the wide backward (above)
  constexpr bool kF64 = std::is_same_v<T, double>;  // the float64 backward (above)
  constexpr int K = (kWide || kF64) ? kPreciseSums<RMS> : RMS ? 1 : 2;
  constexpr int U = kLoopUnroll<A, VEC>;
  __shared__ S red[kMaxWarps * K];
  const int64_t tpr = blockDim.x;
  const int tid = threadIdx.x;
  const int64_t nvec = p.N / VEC;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < p.M;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < p.M;
    const int64_t row_vecs = valid ? nvec : 0;
    const int64_t row_off = row * p.N;
    const A mean = (RMS || !valid || p.mean == nullptr) ? A(0) : p.mean[row];
    const A rstd = valid ? p.rstd[row] : A(0);
    S sums[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      stat_zero(sums[k]);
    }
    for (int64_t base = tid; base < row_vecs; base += tpr * U) {
      A dy[U][VEC];
      A xhat[U][VEC];  // the wide backward: h, or xhat from the output
      if constexpr (kWide || kF64) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t vi = base + u * tpr;
          if (vi < row_vecs) {
            wide_load<VEC>(p, row_off + vi * VEC, vi * VEC, dy[u], xhat[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t vi = base + u * tpr;
          if (vi < row_vecs) {
            precise_sums<RMS, VEC>(p, vi * VEC, mean, dy[u], xhat[u], sums);
          }
        }
      } else {
        bwd_load_terms<RMS, VEC, U>(p, row_off, base, tpr, row_vecs, mean, rstd, dy, xhat, sums);
      }
    }
    row_allreduce(sums, red);
    if constexpr (kWide || kF64) {
      const auto w = precise_row<RMS>(p, mean, rstd, sums);
      if (p.row_xform != nullptr && valid && tid == 0) {
        p.row_xform[row] = w.shift;
        if constexpr (kWide) {
          p.row_xform[p.M + row] = wide_xs(p, w);
          p.row_xform[2 * p.M + row] = w.x_off;
        } else {
          p.row_xform[p.M + row] = w.mean_lo;
          f64_rx(p, w, p.row_xform[2 * p.M + row], p.row_xform[3 * p.M + row]);
        }
      }
      // (the weight gradients alone: the first sweep was for row_xform; the same for every
      // thread of the block, whose next row_allreduce waits for the others first)
      if (p.dh == nullptr && p.dx == nullptr) continue;
      for (int64_t base = tid; base < row_vecs; base += tpr * U) {
        A dy[U][VEC];
        A v[U][VEC];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t vi = base + u * tpr;
          if (vi < row_vecs) {
            wide_load<VEC>(p, row_off + vi * VEC, vi * VEC, dy[u], v[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t vi = base + u * tpr;
          if (vi < row_vecs) {
            part_t<T> gx[VEC];  // (the partials kernel sums the weight gradients)
            precise_store<VEC>(p, row_off + vi * VEC, vi * VEC, w, dy[u], v[u], gx);
          }
        }
      }
    } else {
      A row_rstd = rstd;
      A c_g, c_gx;
      bwd_row_constants<RMS>(p, sums, row_rstd, c_g, c_gx);
      for (int64_t base = tid; base < row_vecs; base += tpr * U) {
        A dy[U][VEC];
        A xhat[U][VEC];
        S unused[K];  // row sums of the first sweep; not needed again
#pragma unroll
        for (int k = 0; k < K; ++k) {
          stat_zero(unused[k]);
        }
        bwd_load_terms<RMS, VEC, U>(p, row_off, base, tpr, row_vecs, mean, rstd, dy, xhat,
                                    unused);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t vi = base + u * tpr;
          if (vi < row_vecs) {
            bwd_store<VEC>(p, row_off + vi * VEC, vi * VEC, row_rstd, c_g, c_gx, dy[u],
                           xhat[u]);
          }
        }
      }
    }
  }
}

// Weight-gradient partials for the looping path: CTA (bx, by) sums dy * xhat and dy over
// columns [32 bx, 32 bx + 32) and rows [by * rows_per_chunk, ...) into part[by, col].
// Block (32, 16); the 16 row lanes are summed in a fixed order.
template <typename T, typename H, typename W>
__global__ void __launch_bounds__(kColTile * kColRows) norm_bwd_weight_partials_kernel(
    const T* __restrict__ dy,                         // [M, N]
    const H* __restrict__ h,                          // [M, N]; nullptr from the output
    const T* __restrict__ y,                          // [M, N] from the output; else nullptr
    const W* __restrict__ gamma,                      // [N] from the output; nullptr: 1
    const W* __restrict__ beta,                       // [N] from the output; nullptr: 0
    const at::opmath_type<T>* __restrict__ mean,      // [M]; nullptr for RMS
    const at::opmath_type<T>* __restrict__ rstd,      // [M]
    const double* __restrict__ row_xform,             // (BwdParams); nullptr: none
    part_t<T>* __restrict__ part_gamma,               // [P, N]; nullptr when not wanted
    part_t<T>* __restrict__ part_beta,                // [P, N]; nullptr when not wanted
    int64_t M, int64_t N, int64_t rows_per_chunk) {
  using A = at::opmath_type<T>;
  // float64: the sums as double-doubles (as the CPU's partials); else in part_t (float32:
  // double).
  constexpr bool kF64 = std::is_same_v<A, double>;
  using S = std::conditional_t<kF64, DoubleDouble, part_t<T>>;
  __shared__ S sg[kColRows][kColTile + 1];
  __shared__ S sb[kColRows][kColTile + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r_end = std::min(M, r_begin + rows_per_chunk);
  S g{};
  S b{};
  if (col < N) {
    const A y_shift = (y != nullptr && beta != nullptr) ? static_cast<A>(beta[col]) : A(0);
    const A y_scale = (y != nullptr && gamma != nullptr) ? static_cast<A>(gamma[col]) : A(1);
#pragma unroll 4
    for (int64_t r = r_begin + ty; r < r_end; r += kColRows) {
      const A d = static_cast<A>(dy[r * N + col]);
      if (row_xform != nullptr) {  // the row kernel's xhat: float32 in double, float64 as
                                   // a double-double
        if constexpr (kF64) {
          double dh, dl;
          two_sum(static_cast<double>(h[r * N + col]), -row_xform[r], dh, dl);
          dl = sub_rn(dl, row_xform[M + r]);
          const double rx = row_xform[2 * M + r];
          const double xp = mul_rn(dh, rx);
          const double xe =
              fma_rn(dh, rx, -xp) + fma_rn(dh, row_xform[3 * M + r], mul_rn(dl, rx));
          stat_add_prod(g, d, xp);
          if (isfinite(g.hi)) g.lo += mul_rn(d, xe);
        } else {
          const double xh = fma(static_cast<double>(h[r * N + col]) - row_xform[r],
                                row_xform[M + r], row_xform[2 * M + r]);
          g += static_cast<S>(static_cast<double>(d) * xh);
        }
      } else {
        A xhat;
        if (y != nullptr) {
          xhat = div_rn(sub_rn(static_cast<A>(y[r * N + col]), y_shift), y_scale);
        } else {
          const A m = mean != nullptr ? mean[r] : A(0);
          if constexpr (kHalfData<T>) {
            xhat = HalfRowXhat(m, rstd[r])(static_cast<A>(h[r * N + col]));
          } else {
            xhat = (static_cast<A>(h[r * N + col]) - m) * rstd[r];
          }
        }
        if constexpr (kF64) {
          stat_add_prod(g, d, xhat);
        } else {
          g += static_cast<S>(d) * static_cast<S>(xhat);
        }
      }
      if constexpr (kF64) {
        stat_add(b, d);
      } else {
        b += static_cast<S>(d);
      }
    }
  }
  sg[ty][tx] = g;
  sb[ty][tx] = b;
  __syncthreads();
  if (ty == 0 && col < N) {
    for (int y = 1; y < kColRows; ++y) {
      if constexpr (kF64) {
        stat_merge(g, sg[y][tx]);
        stat_merge(b, sb[y][tx]);
      } else {
        g += sg[y][tx];
        b += sb[y][tx];
      }
    }
    const int64_t off = static_cast<int64_t>(blockIdx.y) * N + col;
    if (part_gamma != nullptr) {
      part_gamma[off] = static_cast<part_t<T>>(stat_value(g));
    }
    if (part_beta != nullptr) {
      part_beta[off] = static_cast<part_t<T>>(stat_value(b));
    }
  }
}

__device__ __forceinline__ void store_as(void* ptr, c10::ScalarType dtype, int64_t i, double v) {
  switch (dtype) {
    case c10::ScalarType::Double:
      static_cast<double*>(ptr)[i] = v;
      break;
    case c10::ScalarType::Half:  // rounded once, from double
      static_cast<c10::Half*>(ptr)[i] = c10::Half(__double2half(v));
      break;
    case c10::ScalarType::BFloat16:
      static_cast<c10::BFloat16*>(ptr)[i] = c10::BFloat16(__double2bfloat16(v));
      break;
    default:
      static_cast<float*>(ptr)[i] = static_cast<float>(v);
      break;
  }
}

struct WeightGradOutputs {
  void* ptr[2];               // [N] each: grad_gamma and/or grad_beta
  c10::ScalarType dtype[2];   // their dtypes
};

// out[which][col] = sum over p of part[which, p, col] (stat_t: in double for float partials,
// double-double for double ones, i.e. float32 and float64 data), p in increasing order per
// row lane, then the 16 lanes in order. Block (32, 16),
// grid (ceil(N / 32), number of outputs).
template <typename A>
__global__ void __launch_bounds__(kColTile * kColRows) norm_bwd_weight_finalize_kernel(
    const A* __restrict__ part,  // [outputs, P, N]
    int64_t P, int64_t N, WeightGradOutputs out) {
  using S = stat_t<A>;
  __shared__ S s[kColRows][kColTile + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int which = blockIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const A* src = part + which * P * N;
  S sum;
  stat_zero(sum);
  if (col < N) {
#pragma unroll 4
    for (int64_t r = ty; r < P; r += kColRows) {
      stat_add(sum, static_cast<double>(src[r * N + col]));
    }
  }
  s[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && col < N) {
    for (int y = 1; y < kColRows; ++y) {
      stat_merge(sum, s[y][tx]);
    }
    // Selected without indexing the parameter struct dynamically (which would copy it to
    // local memory).
    if (which == 0) {
      store_as(out.ptr[0], out.dtype[0], col, stat_value(sum));
    } else {
      store_as(out.ptr[1], out.dtype[1], col, stat_value(sum));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host side.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

template <typename U>
const U* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<U>() : nullptr;
}

template <typename U>
U* mutable_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<U>() : nullptr;
}

// Threads per row (a power of two up to 32, else a multiple of 32 up to 1024) so that each
// thread gets about per_thread vectors; rows per CTA so that a CTA has >= min_threads threads.
struct RowLaunch {
  int tpr;
  int rows;
};

RowLaunch row_launch(int64_t nvec, int per_thread, int min_threads, int max_threads) {
  const int64_t need = ceil_div(nvec, per_thread);
  int tpr = 1;
  if (need <= kWarpSize) {
    while (tpr < need) {
      tpr *= 2;
    }
  } else {
    tpr = static_cast<int>(std::min<int64_t>(max_threads, ceil_div(need, kWarpSize) * kWarpSize));
  }
  return {tpr, std::max(1, min_threads / tpr)};
}

// ADDNORM_CUDA_MAX_GRID (read once; unset or <= 0: no cap) caps the grid of the row
// kernels, a debug knob for checking that no result depends on the grid size.
int64_t max_grid() {
  static const int64_t cap = [] {
    const char* s = std::getenv("ADDNORM_CUDA_MAX_GRID");
    const long long v = s != nullptr ? std::atoll(s) : 0;
    return v > 0 ? static_cast<int64_t>(v) : static_cast<int64_t>(std::numeric_limits<int32_t>::max());
  }();
  return cap;
}

unsigned int row_grid(int64_t M, int rows) {
  return static_cast<unsigned int>(std::min<int64_t>(
      std::min<int64_t>(ceil_div(M, rows), std::numeric_limits<int32_t>::max()), max_grid()));
}

// Resident CTAs per SM of a kernel at a block shape, cached per device: repeated calls (and
// calls under CUDA graph capture, after a warm-up) skip the occupancy query.
int resident_ctas_per_sm(const void* kernel, int threads, size_t smem) {
  using Key = std::tuple<int, const void*, int, size_t>;
  static std::mutex mutex;
  static std::map<Key, int> cache;
  const Key key{static_cast<int>(c10::cuda::current_device()), kernel, threads, smem};
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(key);
  if (it != cache.end()) {
    return it->second;
  }
  int ctas = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, threads, smem));
  cache.emplace(key, std::max(ctas, 1));
  return std::max(ctas, 1);
}

constexpr int kFwdMinThreads = 128;
constexpr int kBwdMinThreads = 512;  // fewer, larger CTAs: fewer weight-gradient partial rows
// Weight-gradient partial rows, from M and N alone (never from the GPU): register path, at
// most kBwdChunks chunks of whole CTA row groups (about one wave of CTAs on a 132-SM GPU);
// looping path, (column tile, row chunk) CTAs for about kPartialCtas CTAs.
constexpr int64_t kBwdChunks = 256;
constexpr int64_t kPartialCtas = 512;

template <typename T, typename R, typename H, typename W, bool RMS, int VEC>
void launch_fwd_looping(const FwdParams<T, R, H, W>& p, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const RowLaunch cfg =
      row_launch(p.N / VEC, kLoopUnroll<A, VEC>, kFwdMinThreads, kLoopMaxThreads);
  norm_fwd_looping_kernel<T, R, H, W, RMS, VEC>
      <<<row_grid(p.M, cfg.rows), dim3(cfg.tpr, cfg.rows), 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename R, typename H, typename W>
void launch_norm_fwd(const NormFwdArgs& a) {
  using A = at::opmath_type<T>;
  constexpr int VEC = kVec<T>;
  constexpr int VPT = kFwdVpt<T>;
  FwdParams<T, R, H, W> p;
  p.x = a.x.const_data_ptr<T>();
  p.residual = ptr_or_null<R>(a.residual);
  p.gamma = ptr_or_null<W>(a.gamma);
  p.beta = ptr_or_null<W>(a.beta);
  p.out = a.out.mutable_data_ptr<T>();
  p.h_out = mutable_ptr_or_null<H>(a.residual_out);
  p.mean = a.rms ? nullptr : a.mean.mutable_data_ptr<A>();
  p.rstd = a.rstd.mutable_data_ptr<A>();
  p.M = a.M;
  p.N = a.N;
  p.len = {static_cast<double>(a.N), 1.0 / static_cast<double>(a.N)};
  p.eps = a.eps;
  p.drop_seed = a.dropout_p > 0.0 ? a.dropout_seed.const_data_ptr<int64_t>() : nullptr;
  p.drop_threshold = dropout_threshold(a.dropout_p);
  p.drop_scale = dropout_scale<A>(a.dropout_p);

  // (what the kernels only read: load_readonly's alignment; what they write: the vector's)
  const bool vectorized = a.N % VEC == 0 && is_aligned(p.x, kLoadAlign<T, VEC>) &&
                          is_aligned(p.residual, kLoadAlign<R, VEC>) &&
                          is_aligned(p.gamma, kLoadAlign<W, VEC>) &&
                          is_aligned(p.beta, kLoadAlign<W, VEC>) &&
                          is_aligned(p.out, sizeof(Vec<T, VEC>)) &&
                          is_aligned(p.h_out, sizeof(Vec<H, VEC>));
  const int64_t nvec = a.N / VEC;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  ADDNORM_BOOL_SWITCH(a.rms, RMS, [&] {
    if (vectorized && nvec <= static_cast<int64_t>(kMaxThreads) * VPT) {
      const RowLaunch cfg = row_launch(nvec, VPT, kFwdMinThreads, kMaxThreads);
      norm_fwd_register_kernel<T, R, H, W, RMS, VEC, VPT>
          <<<row_grid(a.M, cfg.rows), dim3(cfg.tpr, cfg.rows), 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (vectorized) {
      launch_fwd_looping<T, R, H, W, RMS, VEC>(p, stream);
    } else {
      launch_fwd_looping<T, R, H, W, RMS, 1>(p, stream);
    }
  });
}

// The kernels' template dtypes from the call's (ops/norm_args.h): T input, R residual, H h,
// W weight and bias. float32 and float64 input have one combination each.
template <typename T, typename R, typename H>
void dispatch_fwd_param(const NormFwdArgs& a) {
  if (a.dtypes.param == at::kFloat) {
    launch_norm_fwd<T, R, H, float>(a);
  } else {
    launch_norm_fwd<T, R, H, T>(a);
  }
}

template <typename T>
void dispatch_fwd(const NormFwdArgs& a) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    launch_norm_fwd<T, T, T, T>(a);
  } else if (a.dtypes.h != at::kFloat) {
    dispatch_fwd_param<T, T, T>(a);
  } else if (a.residual.defined() && a.dtypes.residual == at::kFloat) {
    dispatch_fwd_param<T, float, float>(a);
  } else {
    dispatch_fwd_param<T, T, float>(a);
  }
}

template <typename T, typename H, typename W, bool RMS, int VEC>
void launch_bwd_looping(const BwdParams<T, H, W>& p, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const RowLaunch cfg =
      row_launch(p.N / VEC, kLoopUnroll<A, VEC>, kFwdMinThreads, kLoopMaxThreads);
  norm_bwd_looping_kernel<T, H, W, RMS, VEC>
      <<<row_grid(p.M, cfg.rows), dim3(cfg.tpr, cfg.rows), 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename H, typename W>
void launch_norm_bwd(const NormBwdArgs& a) {
  using A = at::opmath_type<T>;
  constexpr int VEC = kVec<T>;
  constexpr int VPT = kBwdVpt<T>;
  constexpr int E = VPT * VEC;
  BwdParams<T, H, W> p;
  p.dy = a.grad_out.const_data_ptr<T>();
  p.dres = ptr_or_null<H>(a.grad_residual_out);
  p.h = a.from_output ? nullptr : a.h.const_data_ptr<H>();
  p.y = a.from_output ? a.h.const_data_ptr<T>() : nullptr;
  p.mean = (a.rms || a.from_output) ? nullptr : a.mean.const_data_ptr<A>();
  p.rstd = a.rstd.const_data_ptr<A>();
  p.gamma = ptr_or_null<W>(a.gamma);
  p.beta = ptr_or_null<W>(a.beta);
  p.dh = mutable_ptr_or_null<H>(a.grad_h);
  p.dx = mutable_ptr_or_null<T>(a.grad_input);
  p.drop_seed = a.grad_input.defined() ? a.dropout_seed.const_data_ptr<int64_t>() : nullptr;
  p.drop_threshold = dropout_threshold(a.dropout_p);
  p.drop_scale = dropout_scale<at::opmath_type<H>>(a.dropout_p);
  p.part_gamma = nullptr;
  p.part_beta = nullptr;
  p.M = a.M;
  p.N = a.N;
  p.len = {static_cast<double>(a.N), 1.0 / static_cast<double>(a.N)};
  p.chunk_rows = 0;  // register path: set below
  constexpr bool kOwnStats = kWideBwd<T, H> || std::is_same_v<T, double>;
  p.eps_given = a.eps.has_value() && !a.from_output;
  p.own_stats = kOwnStats && p.eps_given;
  p.eps = a.eps.value_or(0.0);
  p.row_xform = nullptr;

  const bool want_gamma = a.grad_gamma.defined();
  const bool want_beta = a.grad_beta.defined();
  const int outputs = static_cast<int>(want_gamma) + static_cast<int>(want_beta);
  using Part = part_t<T>;
  const auto part_options = a.h.options().dtype(c10::CppTypeToScalarType<Part>::value);
  // Scratch for the per-chunk partials, [outputs, P, N], and the looping path's row_xform;
  // from the caching allocator (stream-ordered).
  at::Tensor partials;
  at::Tensor row_xform;
  int64_t P = 0;
  auto alloc_partials = [&](int64_t rows) {
    P = rows;
    partials = at::empty({outputs, P, a.N}, part_options);
    Part* base = partials.mutable_data_ptr<Part>();
    p.part_gamma = want_gamma ? base : nullptr;
    p.part_beta = want_beta ? base + (want_gamma ? P * a.N : 0) : nullptr;
  };

  // (as the forward's: read-only pointers to load_readonly's alignment)
  const bool vectorized = a.N % VEC == 0 && is_aligned(p.dy, kLoadAlign<T, VEC>) &&
                          is_aligned(p.dres, kLoadAlign<H, VEC>) &&
                          is_aligned(p.h, kLoadAlign<H, VEC>) &&
                          is_aligned(p.y, kLoadAlign<T, VEC>) &&
                          is_aligned(p.gamma, kLoadAlign<W, VEC>) &&
                          is_aligned(p.beta, kLoadAlign<W, VEC>) &&
                          is_aligned(p.dh, sizeof(Vec<H, VEC>)) &&
                          is_aligned(p.dx, sizeof(Vec<T, VEC>));
  const int64_t nvec = a.N / VEC;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  ADDNORM_BOOL_SWITCH(a.rms, RMS, [&] {
    if (vectorized && nvec <= static_cast<int64_t>(kMaxThreads) * VPT) {
      const RowLaunch cfg = row_launch(nvec, VPT, kBwdMinThreads, kMaxThreads);
      const int threads = cfg.tpr * cfg.rows;
      const size_t smem =
          (outputs > 0 && cfg.rows > 1) ? static_cast<size_t>(threads) * E * sizeof(Part) : 0;
      auto kernel = norm_bwd_register_kernel<T, H, W, RMS, VEC, VPT>;
      // Chunks of whole row groups, each summing many rows, so there are few partial rows;
      // at most one wave of resident CTAs takes them.
      p.chunk_rows = ceil_div(ceil_div(a.M, cfg.rows), kBwdChunks) * cfg.rows;
      const int64_t chunks = ceil_div(a.M, p.chunk_rows);  // <= kBwdChunks
      const int per_sm =
          resident_ctas_per_sm(reinterpret_cast<const void*>(kernel), threads, smem);
      const int64_t grid =
          std::min({chunks, static_cast<int64_t>(sms) * per_sm, max_grid()});
      if (outputs > 0) {
        alloc_partials(chunks);
      }
      norm_bwd_register_kernel<T, H, W, RMS, VEC, VPT>
          <<<static_cast<unsigned int>(grid), dim3(cfg.tpr, cfg.rows), smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      if (kOwnStats && want_gamma && !a.from_output) {
        row_xform = at::empty({std::is_same_v<T, double> ? 4 : 3, a.M},
                              a.h.options().dtype(at::kDouble));
        p.row_xform = row_xform.mutable_data_ptr<double>();
      }
      // With nothing for it to write (the weight gradients alone, their xhat from the saved
      // statistics), the partials kernel below is the whole backward.
      if (p.dh != nullptr || p.dx != nullptr || p.row_xform != nullptr) {
        if (vectorized) {
          launch_bwd_looping<T, H, W, RMS, VEC>(p, stream);
        } else {
          launch_bwd_looping<T, H, W, RMS, 1>(p, stream);
        }
      }
      if (outputs > 0) {
        // About kPartialCtas (column tile, row chunk) CTAs; chunks of >= 16 rows.
        const int64_t col_tiles = ceil_div(a.N, kColTile);
        const int64_t max_chunks = std::min<int64_t>(ceil_div(a.M, kColRows), 1024);
        const int64_t chunks =
            std::clamp<int64_t>(ceil_div(kPartialCtas, col_tiles), 1, max_chunks);
        const int64_t rows_per_chunk = ceil_div(a.M, chunks);
        alloc_partials(ceil_div(a.M, rows_per_chunk));
        norm_bwd_weight_partials_kernel<T, H, W>
            <<<dim3(static_cast<unsigned int>(col_tiles), static_cast<unsigned int>(P)),
               dim3(kColTile, kColRows), 0, stream>>>(
                p.dy, p.h, p.y, p.gamma, p.beta, p.mean, p.rstd, p.row_xform, p.part_gamma,
                p.part_beta, a.M, a.N, rows_per_chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });

  if (outputs > 0) {
    WeightGradOutputs out{};
    int i = 0;
    if (want_gamma) {
      out.ptr[i] = a.grad_gamma.mutable_data_ptr();
      out.dtype[i++] = a.grad_gamma.scalar_type();
    }
    if (want_beta) {
      out.ptr[i] = a.grad_beta.mutable_data_ptr();
      out.dtype[i++] = a.grad_beta.scalar_type();
    }
    norm_bwd_weight_finalize_kernel<Part>
        <<<dim3(static_cast<unsigned int>(ceil_div(a.N, kColTile)), outputs),
           dim3(kColTile, kColRows), 0, stream>>>(partials.const_data_ptr<Part>(), P, a.N, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, typename H>
void dispatch_bwd_param(const NormBwdArgs& a) {
  if (a.dtypes.param == at::kFloat) {
    launch_norm_bwd<T, H, float>(a);
  } else {
    launch_norm_bwd<T, H, T>(a);
  }
}

template <typename T>
void dispatch_bwd(const NormBwdArgs& a) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    launch_norm_bwd<T, T, T>(a);
  } else if (a.dtypes.h == at::kFloat) {
    dispatch_bwd_param<T, float>(a);
  } else {
    dispatch_bwd_param<T, T>(a);
  }
}

void norm_fwd(const NormFwdArgs& args) {
  const c10::cuda::CUDAGuard guard(args.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtypes.x, "addnorm_norm_fwd_cuda",
                                  [&] { dispatch_fwd<scalar_t>(args); });
}

// With the forward's fused dropout the kernels also write grad_input, from grad_h in the
// same pass (store_grads; grad_h itself only when wanted): the CPU kernels' values.
void norm_bwd(const NormBwdArgs& args) {
  const c10::cuda::CUDAGuard guard(args.h.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtypes.x, "addnorm_norm_bwd_cuda",
                                  [&] { dispatch_bwd<scalar_t>(args); });
}

// _dropout_apply: out = input * keep-mask / (1 - p), the mask regenerated from the seed
// (ops/dropout_mask.h), the same function as the CPU kernel's. One thread per group of
// eight elements (one Philox call), loaded and stored as one vector each where in and out
// are aligned to it (vectorized) and the group is whole; the seed is read on the device, so
// a CUDA graph replays with the seed of each replay.
template <typename In, typename Out>
__global__ void dropout_apply_kernel(const In* __restrict__ in, Out* __restrict__ out,
                                     int64_t n, const int64_t* __restrict__ seed,
                                     uint64_t threshold, at::opmath_type<In> scale,
                                     bool vectorized) {
  using A = at::opmath_type<In>;
  const int64_t groups = (n + kDropoutGroup - 1) / kDropoutGroup;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = g * kDropoutGroup;
    const bool whole = vectorized && e0 + kDropoutGroup <= n;
    A v[kDropoutGroup];
    if (whole) {
      load_vec<kDropoutGroup>(in + e0, v);
    } else {
#pragma unroll
      for (int i = 0; i < kDropoutGroup; ++i) {
        v[i] = e0 + i < n ? static_cast<A>(in[e0 + i]) : A(0);
      }
    }
    apply_dropout<kDropoutGroup>(seed, threshold, scale, e0, v);
    if (whole) {
      store_vec<kDropoutGroup>(out + e0, v);
    } else {
#pragma unroll
      for (int i = 0; i < kDropoutGroup; ++i) {
        if (e0 + i < n) {
          out[e0 + i] = static_cast<Out>(v[i]);
        }
      }
    }
  }
}

void dropout_apply(const DropoutApplyArgs& args) {
  const c10::cuda::CUDAGuard guard(args.input.device());
  const int64_t n = args.input.numel();
  const int64_t groups = (n + kDropoutGroup - 1) / kDropoutGroup;
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
    const In* in = args.input.const_data_ptr<In>();
    Out* out = args.out.mutable_data_ptr<Out>();
    const bool vectorized = is_aligned(in, kLoadAlign<In, kDropoutGroup>) &&
                            is_aligned(out, sizeof(Vec<Out, kDropoutGroup>));
    dropout_apply_kernel<In, Out><<<blocks, kThreads, 0, stream>>>(
        in, out, n, seed, threshold, dropout_scale<at::opmath_type<In>>(args.p), vectorized);
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

}  // namespace

TORCH_LIBRARY_IMPL(addnorm, CUDA, m) {
  register_norm_kernels<&norm_fwd, &norm_bwd, &dropout_apply>(m);
}

}  // namespace addnorm::cuda
