// Online softmax over the rows of a score accumulator (rows = queries). Each
// thread holds two rows per m-tile; a row is spread over the 4 threads of a quad.
// exp2 with log2(e) folded into the scale: p = 2^(s * scale_log2 - max * scale_log2).
#pragma once

#include <math_constants.h>

#include "instructions.cuh"

namespace jax_flash {

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffff, v, 1);
  return v + __shfl_xor_sync(0xffffffff, v, 2);
}

template <int kMT>
struct OnlineSoftmax {
  float row_max[kMT][2];
  float row_sum[kMT][2];  // this thread's partial sum; quad-reduced once at the end

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_max[m][h] = -CUDART_INF_F;
        row_sum[m][h] = 0.f;
      }
  }

  // Scores -> unnormalized probabilities in place; rescales the output accumulator
  // by exp(old_max - new_max).
  template <typename AccS, typename AccO>
  __device__ __forceinline__ void update(AccS& s, AccO& o, float scale_log2) {
    float alpha[kMT][2];
    update_scores(s, scale_log2, alpha);
    rescale(o, alpha);
  }

  // The first half of update, for kernels that rescale the output later (while
  // a matrix product still accumulates into it): alpha = exp(old_max - new_max)
  // per row. A row that has seen no key keeps max = -inf and gets p = 0 (the
  // subtracted base is then 0, never -inf - -inf).
  template <typename AccS>
  __device__ __forceinline__ void update_scores(AccS& s, float scale_log2,
                                                float (&alpha)[kMT][2]) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = row_max[mt][h];
#pragma unroll
        for (int nt = 0; nt < AccS::kNT; ++nt)
          mx = fmaxf(mx, fmaxf(s.x[mt][nt][2 * h], s.x[mt][nt][2 * h + 1]));
        mx = quad_max(mx);
        const float base = mx == -CUDART_INF_F ? 0.f : mx * scale_log2;
        alpha[mt][h] = fast_exp2(row_max[mt][h] * scale_log2 - base);
        row_max[mt][h] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < AccS::kNT; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float& x = s.x[mt][nt][2 * h + j];
            x = fast_exp2(fmaf(x, scale_log2, -base));
            sum += x;
          }
        row_sum[mt][h] = fmaf(row_sum[mt][h], alpha[mt][h], sum);
      }
  }

  template <typename AccO>
  static __device__ __forceinline__ void rescale(AccO& o, const float (&alpha)[kMT][2]) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int nt = 0; nt < AccO::kNT; ++nt) {
          o.x[mt][nt][2 * h] *= alpha[mt][h];
          o.x[mt][nt][2 * h + 1] *= alpha[mt][h];
        }
  }

  // Normalizes the output once and returns the natural-log lse of each row
  // (-inf and output 0 for a row that saw no key).
  template <typename AccO>
  __device__ __forceinline__ void finalize(AccO& o, float scale, float (&lse)[kMT][2]) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sum = quad_sum(row_sum[mt][h]);
        const bool empty = !(sum > 0.f);
        const float inv = empty ? 0.f : 1.f / sum;
        lse[mt][h] = empty ? -CUDART_INF_F : row_max[mt][h] * scale + __logf(sum);
#pragma unroll
        for (int nt = 0; nt < AccO::kNT; ++nt) {
          o.x[mt][nt][2 * h] *= inv;
          o.x[mt][nt][2 * h + 1] *= inv;
        }
      }
  }
};

}  // namespace jax_flash
