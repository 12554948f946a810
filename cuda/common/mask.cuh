// Which (query, key) pairs take part: keys inside the sequence, within the
// window around the query's diagonal. Bottom-right aligned: query i's diagonal
// key is i + seq_k - seq_q; it sees key j when
//   i + diag - left <= j <= i + diag + right,
// each side unbounded when negative. A causal mask is right = 0.
#pragma once

#include <math_constants.h>

namespace jax_flash {

struct AttentionMask {
  int seq_q;
  int seq_k;
  int left;   // keys before the diagonal a query sees; < 0: all
  int right;  // keys after it; < 0: all

  template <typename Params>
  __host__ __device__ static AttentionMask of(const Params& p) {
    const int right = p.causal ? 0 : p.window_right;
    return {p.shape.seq_q, p.shape.seq_k, p.window_left, right};
  }

  __device__ __forceinline__ int diag() const { return seq_k - seq_q; }

  // Bitwise, not short-circuit: evaluated per score element, where `&&` made
  // ptxas branch (divergently) on every term instead of selecting.
  __device__ __forceinline__ bool visible(int q_row, int k_col) const {
    return (k_col < seq_k) & ((left < 0) | (k_col >= q_row + diag() - left)) &
           ((right < 0) | (k_col <= q_row + diag() + right));
  }
  __device__ __forceinline__ bool operator()(int q_row, int k_col) const {
    return visible(q_row, k_col);
  }
  // True when some pair of the tile [q0, q0 + rows) x [k0, k0 + cols) is hidden,
  // so tiles fully inside the visible region skip the per-element test.
  __device__ __forceinline__ bool tile_needs_mask(int q0, int rows, int k0, int cols) const {
    return k0 + cols > seq_k || (right >= 0 && k0 + cols - 1 > q0 + diag() + right) ||
           (left >= 0 && k0 < q0 + rows - 1 + diag() - left);
  }
  // [key_begin, key_end): the keys seen by queries [q0, q0 + rows).
  __device__ __forceinline__ int key_begin(int q0) const {
    return left < 0 ? 0 : max(0, q0 + diag() - left);
  }
  __device__ __forceinline__ int key_end(int q0, int rows) const {
    return right < 0 ? seq_k : max(0, min(seq_k, q0 + rows + diag() + right));
  }
  // [first_query, query_end): the queries that see keys [k0, k0 + cols).
  __device__ __forceinline__ int first_query(int k0) const {
    return right < 0 ? 0 : max(0, k0 - diag() - right);
  }
  __device__ __forceinline__ int query_end(int k0, int cols) const {
    return left < 0 ? seq_q : max(0, min(seq_q, k0 + cols - diag() + left));
  }
};

// Sets the scores of an accumulator tile (rows = queries) that visible(query,
// key) hides to -inf, by selects: `visible` should not branch either.
template <typename Acc, typename Visible>
__device__ __forceinline__ void mask_scores(Acc& s, const Visible& visible, int q0, int k0,
                                            int lane) {
#pragma unroll
  for (int mt = 0; mt < Acc::kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < Acc::kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        s.x[mt][nt][i] = visible(q0 + Acc::row(mt, i, lane), k0 + Acc::col(nt, i, lane))
                             ? s.x[mt][nt][i]
                             : -CUDART_INF_F;
}

}  // namespace jax_flash
