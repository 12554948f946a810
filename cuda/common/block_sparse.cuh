// Block-sparse masks: per (batch, head) which blocks of block_q x block_k
// scores are on, as sorted lists: per query block the key blocks that are on,
// per key block the query blocks. Block sizes are multiples of
// kBlockSparseGranule, which every kernel tile divides, so a tile lies in one
// block and a kernel visits the tiles of the blocks on its list only.
#pragma once

#include <climits>
#include <cstdint>

#include "../params.h"

namespace jax_flash {

// One row (or column) of a block mask: the blocks that are on, ascending.
// list == nullptr stands for every block.
struct BlockList {
  const int* list;
  int count;

  // Whether block b is on (binary search).
  __device__ __forceinline__ bool contains(int b) const {
    if (list == nullptr) return true;
    int lo = 0, hi = count;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      const int x = __ldg(list + mid);
      if (x == b) return true;
      if (x < b) lo = mid + 1; else hi = mid;
    }
    return false;
  }

  // How many tiles of [begin, end) lie in blocks on the list (tiles_per_block
  // tiles each), counted by `lanes` threads together: this one takes the list
  // entries from `lane` in steps of `lanes`, and the caller sums the counts.
  __device__ __forceinline__ int tiles_within(int begin, int end, int tiles_per_block, int lane,
                                              int lanes) const {
    if (list == nullptr) return lane == 0 ? max(end - begin, 0) : 0;
    int tiles = 0;
    for (int at = lane; at < count; at += lanes) {
      const int lo = __ldg(list + at) * tiles_per_block;
      tiles += max(0, min(end, lo + tiles_per_block) - max(begin, lo));
    }
    return tiles;
  }

  // The highest tile below n, at least `begin`, of a block on the list
  // (tiles_per_block tiles each); -1 if none. `at`: the list position to start
  // from, moved down as blocks are passed (a walk calls this with n falling).
  __device__ __forceinline__ int tile_below(int n, int begin, int tiles_per_block,
                                            int& at) const {
    if (list == nullptr) return n - 1 >= begin ? n - 1 : -1;
    for (; at >= 0; --at) {
      const int lo = __ldg(list + at) * tiles_per_block;
      const int t = min(n - 1, lo + tiles_per_block - 1);
      if (t >= lo) return t >= begin ? t : -1;
    }
    return -1;
  }

  // The lowest tile at or after m, below `end`, of a block on the list; -1 if
  // none. `at` moves up as blocks are passed (a walk calls this with m rising).
  __device__ __forceinline__ int tile_from(int m, int end, int tiles_per_block, int& at) const {
    if (list == nullptr) return m < end ? m : -1;
    for (; at < count; ++at) {
      const int lo = __ldg(list + at) * tiles_per_block;
      const int t = max(m, lo);
      if (t < lo + tiles_per_block) return t < end ? t : -1;
    }
    return -1;
  }
};

struct BlockSparse {
  BlockSparseParams b;
  int batch;  // the lists' row
  int num_q_blocks;
  int num_k_blocks;

  template <typename Params>
  __device__ static BlockSparse of(const Params& p, int batch) {
    const BlockSparseParams& b = p.block_sparse;
    if (b.q_lists == nullptr) return {b, batch, 0, 0};
    return {b, batch / b.batch_run, (p.shape.seq_q + b.block_q - 1) / b.block_q,
            (p.shape.seq_k + b.block_k - 1) / b.block_k};
  }

  __device__ __forceinline__ bool on() const { return b.q_lists != nullptr; }
  __device__ __forceinline__ int64_t row(int head) const {
    return int64_t(batch) * b.heads + (b.heads == 1 ? 0 : head);
  }
  // Kernel tiles of `tile` queries (keys) per block; 1 without a mask.
  __device__ __forceinline__ int query_tiles_per_block(int tile) const {
    return on() ? b.block_q / tile : 1;
  }
  __device__ __forceinline__ int key_tiles_per_block(int tile) const {
    return on() ? b.block_k / tile : 1;
  }
  // The blocks of query q and of key k (0 without a mask).
  __device__ __forceinline__ int q_block(int q) const { return on() ? q / b.block_q : 0; }
  __device__ __forceinline__ int k_block(int k) const { return on() ? k / b.block_k : 0; }
  // The key blocks on for query block `q_block` of `head`.
  __device__ __forceinline__ BlockList keys_of(int head, int q_block) const {
    if (!on()) return {nullptr, 0};
    const int64_t r = row(head) * num_q_blocks + q_block;
    return {b.q_lists + r * num_k_blocks, __ldg(b.q_counts + r)};
  }
  // The query blocks on for key block `k_block` of `head`.
  __device__ __forceinline__ BlockList queries_of(int head, int k_block) const {
    if (!on()) return {nullptr, 0};
    const int64_t r = row(head) * num_k_blocks + k_block;
    return {b.k_lists + r * num_q_blocks, __ldg(b.k_counts + r)};
  }
};

}  // namespace jax_flash
