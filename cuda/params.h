// Problem description shared by the FFI handlers and the kernels. Every tensor is
// contiguous: q/out/dq [batch, seq_q, heads, head_dim], k/v/dk/dv
// [batch, seq_k, kv_heads, head_dim], lse/dlse/delta [batch, heads, seq_q].
#pragma once

#include <cstdint>

namespace jax_flash {

enum class DType { kF16, kBF16 };

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
  float softmax_scale;
  bool causal;
  int window_left;
  int window_right;
  float softcap;
};

inline constexpr int kDQTurnRows = 64;

}  // namespace jax_flash
