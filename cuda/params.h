// Problem description shared by the FFI handlers and the kernels. Every tensor is
// contiguous: q/out/dq [batch, seq_q, heads, head_dim], k/v/dk/dv
// [batch, seq_k, kv_heads, head_dim], lse/dlse/delta [batch, heads, seq_q].
#pragma once

#include <cstdint>

namespace jax_flash {

enum class DType { kF16, kBF16 };

// Rows per entry of a segment-id range table (common/segments.cuh).
inline constexpr int kSegmentGranule = 64;

// Packed documents: a query sees only keys of its own segment (nullptr: none).
// The range tables hold, per kSegmentGranule consecutive positions, the
// smallest and the largest id, the largest id up to there and the smallest id
// from there on, so a kernel tells from a few loads whether two blocks can
// share a segment and where the blocks that can begin and end.
struct SegmentIds {
  const int* q_ids;      // [batch, seq_q]
  const int* kv_ids;     // [batch, seq_k]
  const int* q_ranges;   // [batch, ceil(seq_q / kSegmentGranule), 4]
  const int* kv_ranges;  // [batch, ceil(seq_k / kSegmentGranule), 4]
};

// Block sizes of a block-sparse mask are multiples of this, which every kernel
// tile divides.
inline constexpr int kBlockSparseGranule = 128;

// A block-sparse mask as lists (common/block_sparse.cuh); q_lists == nullptr:
// none. heads: 1 (one mask for every head) or the query heads. The lists'
// batch' rows divide the call's batch into runs of batch_run rows that share
// one (batch_run = batch for one mask for every row, 1 for a mask per row).
struct BlockSparseParams {
  const int* q_lists;   // [batch', heads, num_q_blocks, num_k_blocks]: key blocks on, ascending
  const int* q_counts;  // [batch', heads, num_q_blocks]
  const int* k_lists;   // [batch', heads, num_k_blocks, num_q_blocks]: query blocks on
  const int* k_counts;  // [batch', heads, num_k_blocks]
  int block_q;
  int block_k;
  int heads;
  int batch_run;
};

// Dropout on the probabilities (common/dropout.cuh); seed == nullptr: none.
struct DropoutParams {
  const uint32_t* seed;  // [2]: the Philox key
  uint32_t threshold;    // a Philox word below it drops its entry
  float scale;           // 1 / (1 - rate), for the kept entries
};

struct AttentionShape {
  int batch;
  int seq_q;
  int seq_k;
  int heads;
  int kv_heads;
  int head_dim;
};

struct FwdParams {
  AttentionShape shape;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  // Workspace [1]: the next tile a persistent kernel hands out (its launcher
  // zeroes it).
  int* tile_counter;
  float softmax_scale;
  bool causal;
  // Keys before / after the diagonal a query sees, -1 for all (common/mask.cuh).
  int window_left;
  int window_right;
  float softcap;  // 0: none (common/softcap.cuh)
  SegmentIds segments;
  const float* alibi_slopes;  // [batch, heads] (common/alibi.cuh); nullptr: none
  DropoutParams dropout;
  BlockSparseParams block_sparse;
};

struct BwdParams {
  AttentionShape shape;
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;
  const float* dlse;
  void* dq;
  void* dk;
  void* dv;
  float* dq_accum;  // fp32 workspace [batch, seq_q, heads, head_dim]
  float* delta;     // workspace [batch, heads, seq_q]: rowsum(dO * O) - dlse
  // Deterministic backward only (else nullptr): workspace [batch, heads,
  // ceil(seq_q / kDQTurnRows)], per query block the index of the key block
  // whose turn it is to add its dQ (see common/dq_turns.cuh).
  int* dq_turns;
  // Otherwise the sm90 backward's persistent blocks claim key blocks from
  // this counter (one int, zeroed by the preprocess pass; the dq_turns
  // workspace).
  int* key_block_counter;
  // Workspace of the sm90 backward's shared key blocks (sm90/bwd_split.h):
  // room for dkv_partial_floats fp32 sums of their dK/dV.
  float* dkv_partials;
  int64_t dkv_partial_floats;
  float softmax_scale;
  bool causal;
  int window_left;
  int window_right;
  float softcap;
  SegmentIds segments;
  const float* alibi_slopes;
  float* dalibi_slopes;  // [batch, heads], zeroed by the preprocess pass; with alibi_slopes
  DropoutParams dropout;
  BlockSparseParams block_sparse;
};

inline constexpr int kDQTurnRows = 64;

// The sm80 kernels come in three builds, as the variants read from arrays cost
// registers even when off, and dropout most: none of them, the masks (segment
// ids, block-sparse) and ALiBi, or those and dropout. The one a call needs:
enum Extras : int { kNoExtras = 0, kMasksAlibi = 1, kAllExtras = 2 };

template <typename Params>
inline Extras extras_of(const Params& p) {
  if (p.dropout.seed != nullptr) return kAllExtras;
  return p.segments.q_ids != nullptr || p.alibi_slopes != nullptr ||
                 p.block_sparse.q_lists != nullptr
             ? kMasksAlibi
             : kNoExtras;
}

}  // namespace jax_flash
