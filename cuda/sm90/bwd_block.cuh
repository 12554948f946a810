// What the sm90 backward kernels share: the query blocks a key block visits,
// its shared memory (K and V, then a ring of stages holding a query block's Q,
// dO, lse and delta), and the producer warpgroup that fills that ring.
#pragma once

#include <cuda.h>
#include <math_constants.h>

#include "../common/block_order.cuh"
#include "../common/bwd_passes.cuh"
#include "../common/mask.cuh"
#include "../params.h"
#include "hopper.cuh"

namespace jax_flash::sm90 {

struct BwdArgs {
  CUtensorMap q, k, v, dout, dq_accum;
  BwdParams p;
};

// The query blocks of a block of keys: those of every query head of its GQA
// group (so the group's dK/dV are summed in registers), each head's from the
// first one that sees the keys; `steps` in all.
struct BwdWalk {
  int kv_head, batch, n0, group, m_begin, m_count, steps, block_m;

  __device__ __forceinline__ BwdWalk(const BwdParams& p, const BlockIndex& bi, int block_m_,
                                     int block_n) {
    const AttentionShape& sh = p.shape;
    kv_head = bi.head;
    batch = bi.batch;
    n0 = bi.tile * block_n;
    block_m = block_m_;
    group = sh.heads / sh.kv_heads;
    const AttentionMask mask{sh.seq_q, sh.seq_k, p.causal};
    m_begin = mask.first_query(n0) / block_m;
    m_count = (sh.seq_q + block_m - 1) / block_m - m_begin;
    steps = group * m_count;
  }
  __device__ __forceinline__ int head(int step) const { return kv_head * group + step / m_count; }
  __device__ __forceinline__ int m0(int step) const {
    return (m_begin + step % m_count) * block_m;
  }
};

// K and V, then K::kStages stages of (Q, dO, lse * log2(e) and delta), from the
// first 1024-byte boundary of the dynamic shared memory; the barriers at
// K::kBarOffset: K/V loaded, then each stage's full and empty.
template <typename K>
struct BwdSmem {
  uint8_t* raw;
  uint32_t base;

  __device__ __forceinline__ explicit BwdSmem(uint8_t* raw_)
      : raw(raw_), base((smem_u32(raw_) + 1023) & ~1023u) {}
  __device__ __forceinline__ uint32_t k() const { return base; }
  __device__ __forceinline__ uint32_t v() const { return base + K::kVOffset; }
  __device__ __forceinline__ uint32_t q(int s) const {
    return base + K::kStageOffset + s * K::kStageBytes;
  }
  __device__ __forceinline__ uint32_t dout(int s) const { return q(s) + K::kQBytes; }
  // lse * log2(e) (+inf for rows that take no part), then delta, of a stage's queries.
  __device__ __forceinline__ float* stats(int s) const {
    return reinterpret_cast<float*>(raw + (dout(s) + K::kQBytes - smem_u32(raw)));
  }
  __device__ __forceinline__ uint32_t full_kv() const { return base + K::kBarOffset; }
  __device__ __forceinline__ uint32_t full(int s) const { return full_kv() + 8 * (1 + s); }
  __device__ __forceinline__ uint32_t empty(int s) const {
    return full_kv() + 8 * (1 + K::kStages + s);
  }

  // By one thread, before a __syncthreads.
  __device__ __forceinline__ void init_barriers() const {
    mbar_init(full_kv(), 1);
    for (int s = 0; s < K::kStages; ++s) {
      mbar_init(full(s), 1 + 32);  // the TMA thread and the lse/delta warp
      mbar_init(empty(s), K::kStageReleases);
    }
    mbar_init_fence();
  }
};

// The producer warpgroup: the first lane of warp 0 loads K and V once and each
// step's Q and dO by TMA; warp 1 writes each step's lse and delta. Both wait
// for the consumer warps to free a stage.
template <typename K>
__device__ __forceinline__ void bwd_produce(const BwdArgs& args, const BwdSmem<K>& sm,
                                            const BwdWalk& walk, int warp, int lane) {
  const BwdParams& p = args.p;
  const AttentionShape& sh = p.shape;
  constexpr int kStages = K::kStages, kBlockM = K::kBlockM, kBlockN = K::kBlockN;
  if (warp == 0 && lane == 0 && walk.steps > 0) {
    mbar_arrive_expect_tx(sm.full_kv(), 2 * K::kKVBytes);
#pragma unroll
    for (int c = 0; c < K::kPanels; ++c) {
      tma_load_4d(sm.k() + c * kBlockN * 128, &args.k, sm.full_kv(), c * 64, walk.kv_head,
                  walk.n0, walk.batch);
      tma_load_4d(sm.v() + c * kBlockN * 128, &args.v, sm.full_kv(), c * 64, walk.kv_head,
                  walk.n0, walk.batch);
    }
    for (int step = 0; step < walk.steps; ++step) {
      const int s = step % kStages, head = walk.head(step), m0 = walk.m0(step);
      mbar_wait(sm.empty(s), ((step / kStages) & 1) ^ 1);
      mbar_arrive_expect_tx(sm.full(s), 2 * K::kQBytes);
#pragma unroll
      for (int c = 0; c < K::kPanels; ++c) {
        tma_load_4d(sm.q(s) + c * kBlockM * 128, &args.q, sm.full(s), c * 64, head, m0,
                    walk.batch);
        tma_load_4d(sm.dout(s) + c * kBlockM * 128, &args.dout, sm.full(s), c * 64, head, m0,
                    walk.batch);
      }
    }
  } else if (warp == 1) {
    for (int step = 0; step < walk.steps; ++step) {
      const int s = step % kStages, head = walk.head(step), m0 = walk.m0(step);
      mbar_wait(sm.empty(s), ((step / kStages) & 1) ^ 1);
      float* stats = sm.stats(s);
      for (int i = lane; i < kBlockM; i += 32) {
        const int row = m0 + i;
        const int64_t r = (int64_t(walk.batch) * sh.heads + head) * sh.seq_q + row;
        const float lse = row < sh.seq_q ? p.lse[r] : -CUDART_INF_F;
        stats[i] = lse == -CUDART_INF_F ? CUDART_INF_F : lse * kLog2e;
        stats[kBlockM + i] = row < sh.seq_q ? p.delta[r] : 0.f;
      }
      mbar_arrive(sm.full(s));
    }
  }
}

}  // namespace jax_flash::sm90
