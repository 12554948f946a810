// Which (query, key) pairs take part: keys inside the sequence and, when causal,
// keys at or before the query's diagonal, bottom-right aligned so that query i
// sees key j <= i + seq_k - seq_q.
#pragma once

#include <math_constants.h>

namespace jax_flash {

struct AttentionMask {
  int seq_q;
  int seq_k;
  bool causal;

  __device__ __forceinline__ bool visible(int q_row, int k_col) const {
    return k_col < seq_k && (!causal || k_col <= q_row + seq_k - seq_q);
  }
  // True when some pair of the tile [q0, q0 + rows) x [k0, k0 + cols) is hidden,
  // so tiles fully inside the visible region skip the per-element test.
  __device__ __forceinline__ bool tile_needs_mask(int q0, int k0, int cols) const {
    return k0 + cols > seq_k || (causal && k0 + cols - 1 > q0 + seq_k - seq_q);
  }
  // Exclusive end of the key range seen by queries [q0, q0 + rows).
  __device__ __forceinline__ int key_end(int q0, int rows) const {
    return causal ? min(seq_k, q0 + rows + seq_k - seq_q) : seq_k;
  }
  // First query that sees key k0 (queries before it see none of [k0, ...)).
  __device__ __forceinline__ int first_query(int k0) const {
    return causal ? max(0, k0 - (seq_k - seq_q)) : 0;
  }
};

// Sets hidden scores of an accumulator tile (rows = queries) to -inf.
template <typename Acc>
__device__ __forceinline__ void mask_scores(Acc& s, const AttentionMask& mask, int q0, int k0,
                                            int lane) {
#pragma unroll
  for (int mt = 0; mt < Acc::kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < Acc::kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (!mask.visible(q0 + Acc::row(mt, i, lane), k0 + Acc::col(nt, i, lane)))
          s.x[mt][nt][i] = -CUDART_INF_F;
}

}  // namespace jax_flash
