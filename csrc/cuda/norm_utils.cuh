#pragma once

// Device helpers shared by the addnorm CUDA kernels: vector loads/stores, row reductions
// (warp shuffles, then shared memory across the warps of a row) and Welford merging.
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

// Loads VEC elements at ptr (aligned to sizeof(Vec<U, VEC>)) converted to A.
template <int VEC, typename U, typename A>
__device__ __forceinline__ void load_vec(const U* __restrict__ ptr, A (&dst)[VEC]) {
  const Vec<U, VEC> v = *reinterpret_cast<const Vec<U, VEC>*>(ptr);
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

// 1 / sqrt(v), correctly rounded division and square root (rsqrtf is only ~2 ulp).
__device__ __forceinline__ float inv_sqrt(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return 1.0 / sqrt(v); }

// Sums K values over the threads of a row; every thread of the row gets the same result
// (xor butterflies are exact mirrors because addition is commutative, and the cross-warp
// step reads the per-warp sums in a fixed order). smem: at least kMaxWarps * K elements.
// Must be reached by every thread of the block (it may call __syncthreads).
template <int K, typename A>
__device__ __forceinline__ void row_allreduce_sum(A (&v)[K], A* smem) {
  const int tpr = blockDim.x;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    if (off < tpr) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
      }
    }
  }
  if (tpr <= kWarpSize) {
    return;
  }
  const int warps = tpr / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  A* row_smem = smem + threadIdx.y * warps * K;
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
      v[k] += row_smem[w * K + k];
    }
  }
}

// Correctly rounded reciprocal, inline (a division may call a slow-path subroutine whose
// calling convention spills live registers in register-heavy loops).
__device__ __forceinline__ float reciprocal(float v) { return __frcp_rn(v); }
__device__ __forceinline__ double reciprocal(double v) { return __drcp_rn(v); }

// Running statistics of a set of values: count, mean and sum of squared deviations (M2).
template <typename A>
struct Welford {
  A count;
  A mean;
  A m2;
};

// Chan et al.'s merge of two disjoint sets' statistics.
template <typename A>
__device__ __forceinline__ Welford<A> welford_merge(const Welford<A>& a, const Welford<A>& b) {
  const A count = a.count + b.count;
  const A ratio = count > A(0) ? b.count * reciprocal(count) : A(0);
  const A delta = b.mean - a.mean;
  return {count, a.mean + delta * ratio, a.m2 + b.m2 + delta * delta * a.count * ratio};
}

// Merges the Welford statistics of the threads of a row; every thread gets the same
// result (each butterfly pair merges in lane order, so both partners compute the same
// value). smem: at least kMaxWarps * 3 elements. Reached by every thread of the block.
template <typename A>
__device__ __forceinline__ Welford<A> row_allreduce_welford(Welford<A> w, A* smem) {
  const int tpr = blockDim.x;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    if (off < tpr) {
      const Welford<A> other{__shfl_xor_sync(0xffffffffu, w.count, off),
                             __shfl_xor_sync(0xffffffffu, w.mean, off),
                             __shfl_xor_sync(0xffffffffu, w.m2, off)};
      w = (threadIdx.x & off) ? welford_merge(other, w) : welford_merge(w, other);
    }
  }
  if (tpr <= kWarpSize) {
    return w;
  }
  const int warps = tpr / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  A* row_smem = smem + threadIdx.y * warps * 3;
  __syncthreads();
  if (lane == 0) {
    row_smem[warp * 3 + 0] = w.count;
    row_smem[warp * 3 + 1] = w.mean;
    row_smem[warp * 3 + 2] = w.m2;
  }
  __syncthreads();
  w = {row_smem[0], row_smem[1], row_smem[2]};
  for (int i = 1; i < warps; ++i) {
    w = welford_merge(w, Welford<A>{row_smem[i * 3 + 0], row_smem[i * 3 + 1], row_smem[i * 3 + 2]});
  }
  return w;
}

}  // namespace addnorm::cuda::detail
