// FlashAttention-2 backward on the sm80 instruction set, in three launches:
//   1. preprocess (bwd_passes.cuh): delta = rowsum(dO * O) - dlse and a zeroed
//      fp32 dQ accumulator;
//   2. main: one block per (key block, kv head, batch). K and V stay in shared
//      memory, dK and dV in registers, while the block walks the query blocks of
//      every query head of its GQA group (so the group's dK/dV are summed here,
//      never materialized per query head). Per query block it recomputes
//      P^T = exp(S^T - lse) from the saved lse, forms dS^T = P^T * (dP^T - delta)
//      and adds its share of dQ into the fp32 accumulator with atomics;
//   3. convert (bwd_passes.cuh): dq = scale * dq_accum in the input dtype.
// Query blocks that cannot see the key block (causal, windows, segments that
// cannot meet, blocks a block-sparse mask has off) are skipped, not masked. The variants enter the recomputed P as
// in the forward; dropout weighs dV's P and dP, and the ALiBi slopes' gradient
// -sum(dS * distance) is summed per warp and added with atomics.
// A deterministic backward adds dQ in key-block order (dq_turns.cuh).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "../common/alibi.cuh"
#include "../common/block_order.cuh"
#include "../common/block_sparse.cuh"
#include "../common/bwd_passes.cuh"
#include "../common/dq_turns.cuh"
#include "../common/dropout.cuh"
#include "../common/mask.cuh"
#include "../common/segments.cuh"
#include "../common/softcap.cuh"
#include "../common/warp_gemm.cuh"
#include "../params.h"
#include "tile_sizes.h"

namespace jax_flash::sm80 {

template <typename T, int kD>
struct BwdKernel {
  using Tile = BwdTile<kD>;
  static constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
  static constexpr int kStages = Tile::kStages;
  static constexpr int kThreads = Tile::kWarps * 32;
  static_assert(kBlockSparseGranule % kBlockM == 0 && kBlockSparseGranule % kBlockN == 0,
                "a tile must lie in one block of a block-sparse mask");
  using SW = typename Tile::ScoreWarps;
  using KVW = typename Tile::KVWarps;
  using QW = typename Tile::QWarps;
  static_assert(SW::kWarpRows * SW::kWarpCols == Tile::kWarps &&
                KVW::kWarpRows * KVW::kWarpCols == Tile::kWarps &&
                QW::kWarpRows * QW::kWarpCols == Tile::kWarps, "warp grids must use every warp");
  // Per-warp sub-tile sizes of each product.
  static constexpr int kSRows = kBlockN / SW::kWarpRows, kSCols = kBlockM / SW::kWarpCols;
  static constexpr int kKVRows = kBlockN / KVW::kWarpRows, kKVCols = kD / KVW::kWarpCols;
  static constexpr int kQRows = kBlockM / QW::kWarpRows, kQCols = kD / QW::kWarpCols;
  using AccS = Accum<kSRows / 16, kSCols / 8>;
  using AccKV = Accum<kKVRows / 16, kKVCols / 8>;
  using AccQ = Accum<kQRows / 16, kQCols / 8>;

  using TileKV = SmemTile<kBlockN, kD>;
  using TileQ = SmemTile<kBlockM, kD>;
  using TileP = SmemTile<kBlockN, kBlockM>;
  static constexpr int kStageBytes = 2 * TileQ::kBytes + 2 * kBlockM * int(sizeof(float));
  static constexpr int kSmemBytes = 2 * TileKV::kBytes + 2 * TileP::kBytes + kStages * kStageBytes;
  static __host__ __device__ TileOrder order(const BwdParams& p) {
    return {(p.shape.seq_k + kBlockN - 1) / kBlockN, p.shape.kv_heads, p.shape.batch, p.causal,
            /*last_tile_longest=*/false};
  }
};

// kExtras: as for the forward kernel.
template <typename T, int kD, int kExtras>
__global__ void __launch_bounds__(BwdKernel<T, kD>::kThreads, 1)
    flash_bwd_kernel(const BwdParams p) {
  constexpr bool kArrays = kExtras != kNoExtras, kDropout = kExtras == kAllExtras;
  using K = BwdKernel<T, kD>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kThreads = K::kThreads;
  extern __shared__ __align__(128) uint8_t smem[];
  const typename K::TileKV sK{smem_u32(smem)};
  const typename K::TileKV sV{sK.base + K::TileKV::kBytes};
  const typename K::TileP sP{sV.base + K::TileKV::kBytes};
  const typename K::TileP sdS{sP.base + K::TileP::kBytes};
  uint8_t* stage_mem = smem + 2 * K::TileKV::kBytes + 2 * K::TileP::kBytes;
  auto sQ = [&](int s) { return typename K::TileQ{smem_u32(stage_mem + s * K::kStageBytes)}; };
  auto sdO = [&](int s) {
    return typename K::TileQ{smem_u32(stage_mem + s * K::kStageBytes + K::TileQ::kBytes)};
  };
  // lse * log2(e) (+inf for rows that take no part) and delta of the stage's queries.
  auto sLse = [&](int s) {
    return reinterpret_cast<float*>(stage_mem + s * K::kStageBytes + 2 * K::TileQ::kBytes);
  };
  auto sDelta = [&](int s) { return sLse(s) + kBlockM; };

  const AttentionShape& sh = p.shape;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const BlockIndex bi = K::order(p).block();
  const int n_block = bi.tile, kv_head = bi.head, batch = bi.batch;
  const int n0 = n_block * kBlockN;
  const int group = sh.heads / sh.kv_heads;
  const AttentionMask mask = AttentionMask::of(p);

  const int64_t q_row_stride = int64_t(sh.heads) * kD;
  const int64_t kv_row_stride = int64_t(sh.kv_heads) * kD;
  const int64_t kv_offset = (int64_t(batch) * sh.seq_k + n0) * kv_row_stride + kv_head * kD;
  const SoftCap softcap = SoftCap::of(p);
  const float softmax_scale = softcap.softmax_scale(p.softmax_scale);
  const float scale_log2 = softmax_scale * kLog2e;
  const SegmentMask segments = kArrays ? SegmentMask::of(p, batch) : SegmentMask{};

  const BlockSparse sparse = kArrays ? BlockSparse::of(p, batch) : BlockSparse{};

  // Query blocks [m_begin, m_end) hold the queries that see these keys and
  // whose segments they can reach.
  const int2 reach = segments.query_reach(n0, kBlockN);
  const int m_begin = max(mask.first_query(n0), reach.x) / kBlockM;
  const int m_end = (min(mask.query_end(n0, kBlockN), reach.y) + kBlockM - 1) / kBlockM;

  // The (query head, query block) pairs this key block visits, in order: the
  // heads of its group in turn, each one's query blocks ascending, of those in
  // [m_begin, m_end) the ones of blocks its block mask has on and whose segments
  // can meet these keys'.
  struct Visit {
    int g;   // the query head within the group
    int at;  // the position in the head's list of query blocks
    int m;   // the query block; < 0: no more visits
  };
  const int k_block = sparse.k_block(n0);
  const int q_tiles_per_block = sparse.query_tiles_per_block(kBlockM);
  auto settle = [&](Visit v) {  // the first visit at or after v
    for (; v.g < group; ++v.g, v.at = 0, v.m = m_begin) {
      const BlockList blocks = sparse.queries_of(kv_head * group + v.g, k_block);
      while ((v.m = blocks.tile_from(v.m, m_end, q_tiles_per_block, v.at)) >= 0) {
        if (segments.blocks_meet(v.m * kBlockM, kBlockM, n0, kBlockN)) return v;
        ++v.m;
      }
    }
    return Visit{group, 0, -1};
  };
  // This key block's turn among those adding to query block m0's dQ: the key
  // blocks from the first that reaches it, less those whose segments cannot
  // meet or whose blocks the block mask has off.
  auto dq_turn = [&](int m0, int head) {
    if (!segments.on() && !sparse.on()) return n_block - mask.key_begin(m0) / kBlockN;
    const int first = max(mask.key_begin(m0), segments.key_reach(m0, kBlockM).x) / kBlockN;
    const BlockList keys = sparse.keys_of(head, sparse.q_block(m0));
    const int k_tiles_per_block = sparse.key_tiles_per_block(kBlockN);
    int turn = 0;
    for (int n = first; n < n_block; ++n)
      turn += keys.contains(n / k_tiles_per_block) &&
              segments.blocks_meet(m0, kBlockM, n * kBlockN, kBlockN);
    return turn;
  };

  auto load_stage = [&](Visit v, int s) {
    const int head = kv_head * group + v.g, m0 = v.m * kBlockM;
    const int64_t q_offset = (int64_t(batch) * sh.seq_q + m0) * q_row_stride + head * kD;
    load_tile_async<kThreads>(sQ(s), static_cast<const T*>(p.q) + q_offset, q_row_stride,
                              sh.seq_q - m0, tid);
    load_tile_async<kThreads>(sdO(s), static_cast<const T*>(p.dout) + q_offset, q_row_stride,
                              sh.seq_q - m0, tid);
    for (int i = tid; i < kBlockM; i += kThreads) {
      const int row = m0 + i;
      const int64_t r = (int64_t(batch) * sh.heads + head) * sh.seq_q + row;
      const float lse = row < sh.seq_q ? p.lse[r] : -CUDART_INF_F;
      sLse(s)[i] = lse == -CUDART_INF_F ? CUDART_INF_F : lse * kLog2e;
      sDelta(s)[i] = row < sh.seq_q ? p.delta[r] : 0.f;
    }
  };

  typename K::AccKV dk, dv;
  dk.zero();
  dv.zero();

  const int s_m0 = (warp % K::SW::kWarpRows) * K::kSRows;  // key rows of S^T
  const int s_n0 = (warp / K::SW::kWarpRows) * K::kSCols;  // query cols of S^T
  const int kv_m0 = (warp % K::KVW::kWarpRows) * K::kKVRows;
  const int kv_n0 = (warp / K::KVW::kWarpRows) * K::kKVCols;
  const int q_m0 = (warp % K::QW::kWarpRows) * K::kQRows;
  const int q_n0 = (warp / K::QW::kWarpRows) * K::kQCols;

  Visit visit = settle(Visit{0, 0, m_begin});
  if (visit.m >= 0) {
    load_tile_async<kThreads>(sK, static_cast<const T*>(p.k) + kv_offset, kv_row_stride,
                              sh.seq_k - n0, tid);
    load_tile_async<kThreads>(sV, static_cast<const T*>(p.v) + kv_offset, kv_row_stride,
                              sh.seq_k - n0, tid);
    load_stage(visit, 0);
    cp_async_commit();
  }

  for (int s = 0; visit.m >= 0; s ^= K::kStages - 1) {
    const int head = kv_head * group + visit.g, m0 = visit.m * kBlockM;
    const Visit next = settle(Visit{visit.g, visit.at, visit.m + 1});
    cp_async_wait<0>();
    __syncthreads();  // this stage landed; every warp is done with the other one and with sP/sdS
    if (K::kStages == 2 && next.m >= 0) {
      load_stage(next, s ^ 1);
      cp_async_commit();
    }
    const Alibi alibi = kArrays ? Alibi::of(p, batch, head, softmax_scale) : Alibi{};
    const Dropout dropout = kDropout ? Dropout::of(p, batch, head) : Dropout{};

    // S^T = K Q^T and dP^T = V dO^T, rows = keys, cols = queries.
    typename K::AccS st, dpt;
    st.zero();
    dpt.zero();
    gemm_ss<T, false, false, kD>(st, sK, s_m0, sQ(s), s_n0, lane);
    gemm_ss<T, false, false, kD>(dpt, sV, s_m0, sdO(s), s_n0, lane);
    const bool need_mask = mask.tile_needs_mask(m0, kBlockM, n0, kBlockN) ||
                           segments.tile_needs_mask(m0, kBlockM, n0, kBlockN);
    auto visible = [&](int query, int key) {
      return mask.visible(query, key) && segments.same(query, key);
    };
    const float* lse = sLse(s);
    const float* delta = sDelta(s);
    // Which elements are visible and which dropout keeps, one bit each, from
    // loops of their own: a branch between exponentials makes each wait for
    // the previous one's result.
    using Bits = ElementBits<typename K::AccS>;
    Bits shown, kept;
    if (need_mask)
      shown.keep_where(
          [&](int mt, int nt, int i) {
            return visible(m0 + s_n0 + K::AccS::col(nt, i, lane),
                           n0 + s_m0 + K::AccS::row(mt, i, lane));
          });
    if (dropout.on())
      dropout.keep_transposed<typename K::AccS>(kept, m0 + s_n0, n0 + s_m0, lane);
    const float kept_scale = dropout.on() ? dropout.scale : 1.f;
    float dslope = 0.f;  // this thread's part of -sum(dS * distance)
#pragma unroll
    for (int mt = 0; mt < K::AccS::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < K::AccS::kNT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int query = s_n0 + K::AccS::col(nt, i, lane);
          const int key = n0 + s_m0 + K::AccS::row(mt, i, lane);
          float score = st.x[mt][nt][i], slope = 1.f;
          if (softcap.on()) {
            const float t = tanhf(score * softcap.inner);
            score = softcap.cap * t;
            slope = 1.f - t * t;
          }
          if constexpr (kArrays) score += alibi.bias(m0 + query, key);
          const float pv = shown.get(mt, nt, i)
                               ? fast_exp2(fmaf(score, scale_log2, -lse[query])) : 0.f;
          const float factor = kept.get(mt, nt, i) ? kept_scale : 0.f;
          const float ds = pv * (dpt.x[mt][nt][i] * factor - delta[query]);
          st.x[mt][nt][i] = pv * factor;
          dpt.x[mt][nt][i] = ds * slope;
          if constexpr (kArrays) dslope = fmaf(-ds, alibi.distance(m0 + query, key), dslope);
        }
    if (alibi.on()) {
#pragma unroll
      for (int o = 16; o > 0; o /= 2) dslope += __shfl_xor_sync(0xffffffff, dslope, o);
      if (lane == 0)
        atomicAdd(p.dalibi_slopes + int64_t(batch) * sh.heads + head, dslope);
    }
    store_accum_smem<T>(st, sP, s_m0, s_n0, lane);
    store_accum_smem<T>(dpt, sdS, s_m0, s_n0, lane);
    __syncthreads();  // P^T and dS^T visible to all warps

    // dV += P^T dO, dK += dS^T Q (rows = keys).
    gemm_ss<T, false, true, kBlockM>(dv, sP, kv_m0, sdO(s), kv_n0, lane);
    gemm_ss<T, false, true, kBlockM>(dk, sdS, kv_m0, sQ(s), kv_n0, lane);

    // dQ += dS K for this block's keys, into the fp32 accumulator.
    typename K::AccQ dq;
    dq.zero();
    gemm_ss<T, true, true, kBlockN>(dq, sdS, q_m0, sK, q_n0, lane);
    float* dq_accum = p.dq_accum + (int64_t(batch) * sh.seq_q + m0) * q_row_stride + head * kD +
                      q_n0 + K::AccQ::col(0, 0, lane);
    const DQTurns turns(p, batch, head, m0);
    if (turns.counter != nullptr) {
      // The first key block that reaches this query block takes turn 0.
      if (tid == 0) turns.wait(dq_turn(m0, head));
      __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < K::AccQ::kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = q_m0 + K::AccQ::row(mt, 2 * h, lane);
        if (m0 + row >= sh.seq_q) continue;
        float* dst = dq_accum + row * q_row_stride;
#pragma unroll
        for (int nt = 0; nt < K::AccQ::kNT; ++nt)
          atomic_add_f32x2(dst + nt * 8, dq.x[mt][nt][2 * h], dq.x[mt][nt][2 * h + 1]);
      }
    if (turns.counter != nullptr) {
      __syncthreads();
      if (tid == 0) turns.pass();
    }

    if (K::kStages == 1 && next.m >= 0) {
      __syncthreads();  // every warp is done with the single stage
      load_stage(next, 0);
      cp_async_commit();
    }
    visit = next;
  }

  // Epilogue: dK picks up the softmax scale here; dV needs none.
  T* dk_out = static_cast<T*>(p.dk) + kv_offset;
  T* dv_out = static_cast<T*>(p.dv) + kv_offset;
#pragma unroll
  for (int mt = 0; mt < K::AccKV::kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = kv_m0 + K::AccKV::row(mt, 2 * h, lane);
      if (n0 + row >= sh.seq_k) continue;
#pragma unroll
      for (int nt = 0; nt < K::AccKV::kNT; ++nt) {
        const int64_t off = row * kv_row_stride + kv_n0 + K::AccKV::col(nt, 0, lane);
        *reinterpret_cast<uint32_t*>(dk_out + off) =
            pack2<T>(dk.x[mt][nt][2 * h] * p.softmax_scale, dk.x[mt][nt][2 * h + 1] * p.softmax_scale);
        *reinterpret_cast<uint32_t*>(dv_out + off) =
            pack2<T>(dv.x[mt][nt][2 * h], dv.x[mt][nt][2 * h + 1]);
      }
    }
}

template <typename T, int kD>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using K = BwdKernel<T, kD>;
  launch_bwd_preprocess<T, kD>(p, stream);

  auto kernel = extras_of(p) == kAllExtras       ? flash_bwd_kernel<T, kD, kAllExtras>
                : extras_of(p) == kMasksAlibi ? flash_bwd_kernel<T, kD, kMasksAlibi>
                                                 : flash_bwd_kernel<T, kD, kNoExtras>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<K::order(p).grid(),
           K::kThreads, K::kSmemBytes, stream>>>(p);

  launch_bwd_convert_dq<T, kD>(p, stream);
  return cudaGetLastError();
}

}  // namespace jax_flash::sm80
