// ALiBi: the score of query i for key j gets -slope * |j - (i + seq_k - seq_q)|,
// a per-head slope times the distance from the query's diagonal, in the units
// of the final (scaled, capped) score.
#pragma once

#include "../params.h"

namespace jax_flash {

struct Alibi {
  float slope;  // over the scale the softmax applies, so that raw scores take it
  int diag;
  bool enabled;

  // Off: slope 0, so that a kernel may add the bias without a branch.
  template <typename Params>
  __device__ static Alibi of(const Params& p, int batch, int head, float softmax_scale) {
    if (p.alibi_slopes == nullptr) return {0.f, 0, false};
    return {__ldg(p.alibi_slopes + int64_t(batch) * p.shape.heads + head) / softmax_scale,
            p.shape.seq_k - p.shape.seq_q, true};
  }

  __device__ __forceinline__ bool on() const { return enabled; }
  __device__ __forceinline__ float distance(int q, int k) const {
    return fabsf(float(k - q - diag));
  }
  __device__ __forceinline__ float bias(int q, int k) const { return -slope * distance(q, k); }

  // Adds the bias to an accumulator tile of raw scores (rows = queries).
  template <typename Acc>
  __device__ __forceinline__ void apply(Acc& s, int q0, int k0, int lane) const {
#pragma unroll
    for (int mt = 0; mt < Acc::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < Acc::kNT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          s.x[mt][nt][i] += bias(q0 + Acc::row(mt, i, lane), k0 + Acc::col(nt, i, lane));
  }
};

}  // namespace jax_flash
