// CPU kernels of the fused Add & Norm ops: one template serves LayerNorm and RMSNorm,
// with and without residual, for float32/float64/float16/bfloat16 and mixed dtypes.
//
// Compiled once per instruction set: CPU_CAPABILITY names the namespace (DEFAULT, AVX2)
// and selects at::vec's implementation. Rows are split across threads with
// at::parallel_for; a row lives in an fp32 scratch buffer (L1/L2) between its passes, so
// memory sees each input read once and each output written once.

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/norm_kernel.h"

namespace addnorm::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Compute type: float for float/half/bfloat16, double for double.
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

// Rows are summed in blocks: lanes accumulate kBlock elements in the compute type, then
// the blocks' totals are added in double with Kahan compensation, so the error does not
// grow with N (float64 rows need the compensation: their lanes are double already).
constexpr int64_t kBlock = 512;

struct CompensatedSum {
  double sum = 0.0;
  double carry = 0.0;
  void add(double v) {
    const double y = v - carry;
    const double t = sum + y;
    // Inf/NaN: no compensation (inf - inf would turn an infinite sum into NaN).
    carry = std::isfinite(t) ? (t - sum) - y : 0.0;
    sum = t;
  }
};

template <typename A>
inline double reduce_lanes(const Vectorized<A>& a, const Vectorized<A>& b) {
  return static_cast<double>(
      at::vec::vec_reduce_all<A>([](auto x, auto y) { return x + y; }, a + b));
}

// Sum over j < n of the values that fv(j) (two vectors at j, W = 2 * V::size() elements)
// and fs(j) (one element at j) produce, in blocks of kBlock.
template <typename A, typename FV, typename FS>
double blocked_sum(int64_t n, const FV& fv, const FS& fs) {
  using V = Vectorized<A>;
  constexpr int64_t W = 2 * V::size();
  CompensatedSum total;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    V s0(A(0)), s1(A(0));
    int64_t j = b0;
    for (; j + W <= b1; j += W) {
      V a0, a1;
      fv(j, a0, a1);
      s0 = s0 + a0;
      s1 = s1 + a1;
    }
    A tail = 0;
    for (; j < b1; ++j) tail += fs(j);
    total.add(reduce_lanes<A>(s0, s1));
    total.add(static_cast<double>(tail));
  }
  return total.sum;
}

// (v - mean) * rstd, with mean = mean_hi + mean_lo and rstd = rstd_hi + rstd_lo given as
// the compute type plus the rounding error of the double statistics, so that rounding
// mean and rstd to float costs no accuracy. For float64 (nothing wider is cheap) the
// difference is kept exactly as a sum of two doubles (TwoSum): only the product rounds.
template <typename S>
inline S fma_of(const S& a, const S& b, const S& c) {
  if constexpr (std::is_floating_point_v<S>) {
    return std::fma(a, b, c);
  } else {
    return at::vec::fmadd(a, b, c);
  }
}

template <typename S>
inline S normalized(const S& v, const S& mean_hi, const S& mean_lo, const S& rstd_hi,
                    const S& rstd_lo) {
  if constexpr (std::is_same_v<S, double> || std::is_same_v<S, Vectorized<double>>) {
    const S hi = v - mean_hi;
    const S z = hi - v;
    const S lo = (v - (hi - z)) - (mean_hi + z);
    return fma_of(hi, rstd_hi, lo * rstd_hi);
  } else {
    const S d = (v - mean_hi) - mean_lo;
    return fma_of(d, rstd_hi, d * rstd_lo);
  }
}

// ---------------------------------------------------------------------------------------
// Forward
//   x, out: [M, N] T;  residual: [M, N] R;  residual_out: [M, N] H (h = x + residual)
//   gamma, beta: [N] A;  mean, rstd: [M] A

template <typename T, typename R, typename H>
void norm_fwd_typed(const NormFwdArgs& args, const at::Tensor& gamma_t, const at::Tensor& beta_t) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t W = Pack<T>::kWidth;
  static_assert(Pack<R>::kWidth == W && Pack<H>::kWidth == W, "mixed widths");

  const int64_t M = args.M;
  const int64_t N = args.N;
  const T* x_base = args.x.const_data_ptr<T>();
  const R* r_base = args.residual.defined() ? args.residual.const_data_ptr<R>() : nullptr;
  H* h_base = args.residual_out.defined() ? args.residual_out.mutable_data_ptr<H>() : nullptr;
  T* y_base = args.out.mutable_data_ptr<T>();
  A* mean_base = args.mean.defined() ? args.mean.mutable_data_ptr<A>() : nullptr;
  A* rstd_base = args.rstd.mutable_data_ptr<A>();
  const A* gamma = gamma_t.const_data_ptr<A>();
  const A* beta = beta_t.const_data_ptr<A>();
  const bool rms = args.rms;
  const double eps = args.eps;
  const int64_t grain = std::max<int64_t>(1, 16384 / N);

  // float32/float64 rows without a residual are normalized in place: no scratch row.
  const bool needs_scratch = r_base != nullptr || !std::is_same_v<T, A>;

  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<A[]> scratch(needs_scratch ? new A[N] : nullptr);
    for (int64_t i = begin; i < end; ++i) {
      const T* x = x_base + i * N;
      H* h = h_base ? h_base + i * N : nullptr;
      const A* v = scratch.get();  // the row being normalized, in the compute type

      // Pass 1: v = h = x (+ residual), rounded to H (written to residual_out if asked),
      // and its sum for the mean.
      A* sv = scratch.get();
      double sum = 0.0;
      if (r_base) {
        const R* r = r_base + i * N;
        sum = blocked_sum<A>(
            N,
            [&](int64_t j, V& a0, V& a1) {
              V b0, b1;
              Pack<T>::load(x + j, a0, a1);
              Pack<R>::load(r + j, b0, b1);
              a0 = a0 + b0;
              a1 = a1 + b1;
              Pack<H>::round_store(h ? h + j : nullptr, a0, a1);
              a0.store(sv + j);
              a1.store(sv + j + V::size());
            },
            [&](int64_t j) {
              const H hv = static_cast<H>(to_acc<A>(x[j]) + to_acc<A>(r[j]));
              if (h) h[j] = hv;
              return sv[j] = to_acc<A>(hv);
            });
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
          sum = blocked_sum<A>(
              N,
              [&](int64_t j, V& a0, V& a1) {
                a0 = V::loadu(x + j);
                a1 = V::loadu(x + j + V::size());
              },
              [&](int64_t j) { return x[j]; });
        } else {
          sum = blocked_sum<A>(
              N,
              [&](int64_t j, V& a0, V& a1) {
                Pack<T>::load(x + j, a0, a1);
                a0.store(sv + j);
                a1.store(sv + j + V::size());
              },
              [&](int64_t j) { return sv[j] = to_acc<A>(x[j]); });
        }
      }

      // Pass 2: variance as the mean of squared deviations (two-pass; RMSNorm: mean 0).
      const double mean = rms ? 0.0 : sum / N;
      const A mean_a = static_cast<A>(mean);
      const V mean_v(mean_a);
      const double var =
          blocked_sum<A>(
              N,
              [&](int64_t j, V& a0, V& a1) {
                a0 = V::loadu(v + j) - mean_v;
                a1 = V::loadu(v + j + V::size()) - mean_v;
                a0 = a0 * a0;
                a1 = a1 * a1;
              },
              [&](int64_t j) { const A d = v[j] - mean_a; return d * d; }) / N;
      const double rstd = 1.0 / std::sqrt(var + eps);
      const A rstd_a = static_cast<A>(rstd);
      if (mean_base) mean_base[i] = mean_a;
      rstd_base[i] = rstd_a;

      // Pass 3: out = (v - mean) * rstd * gamma + beta.
      T* y = y_base + i * N;
      // mean and rstd as the compute type plus their rounding error (see normalized).
      const A mean_lo = static_cast<A>(mean - static_cast<double>(mean_a));
      const A rstd_lo = static_cast<A>(rstd - static_cast<double>(rstd_a));
      const V rstd_v(rstd_a), mean_lo_v(mean_lo), rstd_lo_v(rstd_lo);
      int64_t j = 0;
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
            normalized(v[j], mean_a, mean_lo, rstd_a, rstd_lo) * gamma[j] + beta[j]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward
//   grad_out: [M, N] G;  h, grad_h, grad_residual_out: [M, N] X;  mean, rstd: [M] A
//   gamma: [N] A;  partials: [chunks, 2, N] A (dgamma, dbeta of each chunk of rows)
//
//   xhat = (h - mean) * rstd,  g = dy * gamma
//   dh = rstd * (g - mean(g) - xhat * mean(g * xhat))      (RMSNorm: no mean(g) term)

template <typename G, typename X>
void norm_bwd_typed(const NormBwdArgs& args, const at::Tensor& gamma_t, const at::Tensor& partials) {
  using A = acc_t<X>;
  using V = Vectorized<A>;
  constexpr int64_t W = Pack<X>::kWidth;
  static_assert(Pack<G>::kWidth == W, "mixed widths");

  const int64_t M = args.M;
  const int64_t N = args.N;
  const G* dy_base = args.grad_out.const_data_ptr<G>();
  const X* dres_base =
      args.grad_residual_out.defined() ? args.grad_residual_out.const_data_ptr<X>() : nullptr;
  const X* h_base = args.h.const_data_ptr<X>();
  const A* mean_base = args.mean.defined() ? args.mean.const_data_ptr<A>() : nullptr;
  const A* rstd_base = args.rstd.const_data_ptr<A>();
  const A* gamma = gamma_t.const_data_ptr<A>();
  X* dx_base = args.grad_h.mutable_data_ptr<X>();
  A* partial_base = partials.defined() ? partials.mutable_data_ptr<A>() : nullptr;
  const int64_t chunks = partials.defined() ? partials.size(0)
                                            : std::max<int64_t>(1, at::get_num_threads());
  const bool rms = args.rms;

  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::unique_ptr<A[]> xhat(new A[N]);
    std::unique_ptr<A[]> g(new A[N]);
    for (int64_t c = c_begin; c < c_end; ++c) {
      A* dgamma = partial_base ? partial_base + c * 2 * N : nullptr;
      A* dbeta = partial_base ? dgamma + N : nullptr;
      if (dgamma) {
        std::fill(dgamma, dgamma + 2 * N, A(0));
      }
      const int64_t row_begin = M * c / chunks;
      const int64_t row_end = M * (c + 1) / chunks;
      for (int64_t i = row_begin; i < row_end; ++i) {
        const G* dy = dy_base + i * N;
        const X* h = h_base + i * N;
        const A mean_a = mean_base ? mean_base[i] : A(0);
        const A rstd_a = rstd_base[i];
        const V mean_v(mean_a), rstd_v(rstd_a);

        // Pass 1: xhat, g and their row sums; dgamma/dbeta partials.
        CompensatedSum sum_g, sum_gx;
        for (int64_t b0 = 0; b0 < N; b0 += kBlock) {
          const int64_t b1 = std::min(N, b0 + kBlock);
          V sg0(A(0)), sg1(A(0)), sgx0(A(0)), sgx1(A(0));
          int64_t j = b0;
          for (; j + W <= b1; j += W) {
            V dy0, dy1, h0, h1;
            Pack<G>::load(dy + j, dy0, dy1);
            Pack<X>::load(h + j, h0, h1);
            const V xh0 = (h0 - mean_v) * rstd_v;
            const V xh1 = (h1 - mean_v) * rstd_v;
            const V g0 = dy0 * V::loadu(gamma + j);
            const V g1 = dy1 * V::loadu(gamma + j + V::size());
            xh0.store(xhat.get() + j);
            xh1.store(xhat.get() + j + V::size());
            g0.store(g.get() + j);
            g1.store(g.get() + j + V::size());
            sg0 = sg0 + g0;
            sg1 = sg1 + g1;
            sgx0 = at::vec::fmadd(g0, xh0, sgx0);
            sgx1 = at::vec::fmadd(g1, xh1, sgx1);
            if (dgamma) {
              at::vec::fmadd(dy0, xh0, V::loadu(dgamma + j)).store(dgamma + j);
              at::vec::fmadd(dy1, xh1, V::loadu(dgamma + j + V::size())).store(dgamma + j + V::size());
              (V::loadu(dbeta + j) + dy0).store(dbeta + j);
              (V::loadu(dbeta + j + V::size()) + dy1).store(dbeta + j + V::size());
            }
          }
          A tg = 0, tgx = 0;
          for (; j < b1; ++j) {
            const A dyj = to_acc<A>(dy[j]);
            const A xh = (to_acc<A>(h[j]) - mean_a) * rstd_a;
            const A gj = dyj * gamma[j];
            xhat[j] = xh;
            g[j] = gj;
            tg += gj;
            tgx += gj * xh;
            if (dgamma) {
              dgamma[j] += dyj * xh;
              dbeta[j] += dyj;
            }
          }
          sum_g.add(reduce_lanes<A>(sg0, sg1));
          sum_g.add(static_cast<double>(tg));
          sum_gx.add(reduce_lanes<A>(sgx0, sgx1));
          sum_gx.add(static_cast<double>(tgx));
        }
        const A c1 = rms ? A(0) : static_cast<A>(sum_g.sum / N);
        const A c2 = static_cast<A>(sum_gx.sum / N);

        // Pass 2: dh = rstd * (g - c1 - xhat * c2) (+ grad of the returned h).
        const V c1_v(c1), neg_c2_v(-c2);
        X* dx = dx_base + i * N;
        const X* dres = dres_base ? dres_base + i * N : nullptr;
        int64_t j = 0;
        for (; j + W <= N; j += W) {
          // fma: xhat * c2 is not rounded before the subtraction.
          V d0 = rstd_v * at::vec::fmadd(V::loadu(xhat.get() + j), neg_c2_v,
                                         V::loadu(g.get() + j) - c1_v);
          V d1 = rstd_v * at::vec::fmadd(V::loadu(xhat.get() + j + V::size()), neg_c2_v,
                                         V::loadu(g.get() + j + V::size()) - c1_v);
          if (dres) {
            V r0, r1;
            Pack<X>::load(dres + j, r0, r1);
            d0 = d0 + r0;
            d1 = d1 + r1;
          }
          Pack<X>::store(dx + j, d0, d1);
        }
        for (; j < N; ++j) {
          A d = rstd_a * fma_of(xhat[j], -c2, g[j] - c1);
          if (dres) d += to_acc<A>(dres[j]);
          dx[j] = static_cast<X>(d);
        }
      }
    }
  });
}

template <typename T>
void norm_fwd_reduced(const NormFwdArgs& args, const at::Tensor& gamma, const at::Tensor& beta) {
  const bool float_residual =
      args.residual.defined() && args.residual.scalar_type() == at::kFloat;
  if (float_residual) {
    norm_fwd_typed<T, float, float>(args, gamma, beta);
  } else if (args.h_dtype == at::kFloat) {
    norm_fwd_typed<T, T, float>(args, gamma, beta);
  } else {
    norm_fwd_typed<T, T, T>(args, gamma, beta);
  }
}

template <typename G>
void norm_bwd_reduced(const NormBwdArgs& args, const at::Tensor& gamma, const at::Tensor& partials) {
  if (args.h.scalar_type() == at::kFloat) {
    norm_bwd_typed<G, float>(args, gamma, partials);
  } else {
    norm_bwd_typed<G, G>(args, gamma, partials);
  }
}

}  // namespace

void norm_fwd_kernel(const NormFwdArgs& args, const at::Tensor& gamma, const at::Tensor& beta) {
  switch (args.x.scalar_type()) {
    case at::kFloat:
      return norm_fwd_typed<float, float, float>(args, gamma, beta);
    case at::kDouble:
      return norm_fwd_typed<double, double, double>(args, gamma, beta);
    case at::kBFloat16:
      return norm_fwd_reduced<c10::BFloat16>(args, gamma, beta);
    case at::kHalf:
      return norm_fwd_reduced<c10::Half>(args, gamma, beta);
    default:
      TORCH_CHECK(false, "addnorm: unsupported input dtype ", args.x.scalar_type());
  }
}

void norm_bwd_kernel(const NormBwdArgs& args, const at::Tensor& gamma, const at::Tensor& partials) {
  switch (args.grad_out.scalar_type()) {
    case at::kFloat:
      TORCH_CHECK(args.h.scalar_type() == at::kFloat, "addnorm: grad_out is float32 but h is ",
                  args.h.scalar_type());
      return norm_bwd_typed<float, float>(args, gamma, partials);
    case at::kDouble:
      TORCH_CHECK(args.h.scalar_type() == at::kDouble, "addnorm: grad_out is float64 but h is ",
                  args.h.scalar_type());
      return norm_bwd_typed<double, double>(args, gamma, partials);
    case at::kBFloat16:
      return norm_bwd_reduced<c10::BFloat16>(args, gamma, partials);
    case at::kHalf:
      return norm_bwd_reduced<c10::Half>(args, gamma, partials);
    default:
      TORCH_CHECK(false, "addnorm: unsupported grad_out dtype ", args.grad_out.scalar_type());
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace addnorm::cpu
