// FlashAttention-2 forward on the sm80 instruction set.
//
// One block: kBlockM queries of one head. Q stays in shared memory; K and V tiles
// stream through single buffers, each loaded while the other is consumed (V during
// QK^T and softmax, the next K during PV). Key blocks are visited from last to
// first so that the ones needing a mask (the causal diagonal, the ragged end) come
// first and the rest run unmasked; under a window only the blocks it reaches,
// with packed documents only the blocks whose segments can meet these queries',
// with a block-sparse mask only the blocks it has on.
// The variants act on the score tile in order: soft cap, ALiBi, mask; dropout
// then on the probabilities, after the softmax has summed them. P never leaves
// registers; the output is normalized once at the end and O and lse are
// written once.
#pragma once

#include <cuda_runtime.h>

#include "../common/alibi.cuh"
#include "../common/block_order.cuh"
#include "../common/block_sparse.cuh"
#include "../common/dropout.cuh"
#include "../common/mask.cuh"
#include "../common/segments.cuh"
#include "../common/softcap.cuh"
#include "../common/softmax.cuh"
#include "../common/warp_gemm.cuh"
#include "../params.h"
#include "tile_sizes.h"

namespace jax_flash::sm80 {

template <typename T, int kD>
struct FwdKernel {
  using Tile = FwdTile<kD>;
  static constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
  static constexpr int kThreads = Tile::kWarps * 32;
  static constexpr int kWarpRows = kBlockM / Tile::kWarps;
  static constexpr int kMT = kWarpRows / 16;
  using TileQ = SmemTile<kBlockM, kD>;
  using TileKV = SmemTile<kBlockN, kD>;
  static constexpr int kSmemBytes = TileQ::kBytes + 2 * TileKV::kBytes;
  using AccS = Accum<kMT, kBlockN / 8>;
  using AccO = Accum<kMT, kD / 8>;
  static_assert(kBlockSparseGranule % kBlockM == 0 && kBlockSparseGranule % kBlockN == 0,
                "a tile must lie in one block of a block-sparse mask");
  static __host__ __device__ TileOrder order(const FwdParams& p) {
    return {(p.shape.seq_q + kBlockM - 1) / kBlockM, p.shape.heads, p.shape.batch, p.causal,
            /*last_tile_longest=*/true};
  }
};

// kExtras: which variants read from arrays the build has (params.h's Extras).
template <typename T, int kD, int kExtras>
__global__ void __launch_bounds__(FwdKernel<T, kD>::kThreads)
    flash_fwd_kernel(const FwdParams p) {
  constexpr bool kArrays = kExtras != kNoExtras, kDropout = kExtras == kAllExtras;
  using K = FwdKernel<T, kD>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kThreads = K::kThreads;
  extern __shared__ __align__(128) uint8_t smem[];
  const typename K::TileQ sQ{smem_u32(smem)};
  const typename K::TileKV sK{sQ.base + K::TileQ::kBytes};
  const typename K::TileKV sV{sK.base + K::TileKV::kBytes};

  const AttentionShape& sh = p.shape;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const BlockIndex bi = K::order(p).block();
  const int m_block = bi.tile, head = bi.head, batch = bi.batch;
  const int kv_head = head / (sh.heads / sh.kv_heads);
  const int m0 = m_block * kBlockM;
  const int warp_m0 = warp * K::kWarpRows;
  const AttentionMask mask = AttentionMask::of(p);

  const int64_t q_row_stride = int64_t(sh.heads) * kD;
  const int64_t kv_row_stride = int64_t(sh.kv_heads) * kD;
  const T* q = static_cast<const T*>(p.q) + (int64_t(batch) * sh.seq_q + m0) * q_row_stride +
               head * kD;
  const T* k = static_cast<const T*>(p.k) + int64_t(batch) * sh.seq_k * kv_row_stride +
               kv_head * kD;
  const T* v = static_cast<const T*>(p.v) + int64_t(batch) * sh.seq_k * kv_row_stride +
               kv_head * kD;
  T* out = static_cast<T*>(p.out) + (int64_t(batch) * sh.seq_q + m0) * q_row_stride + head * kD;
  float* lse_out = p.lse + (int64_t(batch) * sh.heads + head) * sh.seq_q + m0;

  // Key blocks [n_begin, n_blocks) hold the keys these queries see and whose
  // segments they can reach; of those, the ones of blocks the block mask has on
  // and whose segments can meet theirs take part.
  const SegmentMask segments = kArrays ? SegmentMask::of(p, batch) : SegmentMask{};
  const BlockSparse sparse = kArrays ? BlockSparse::of(p, batch) : BlockSparse{};
  const int2 reach = segments.key_reach(m0, kBlockM);
  const int n_begin = max(mask.key_begin(m0), reach.x) / kBlockN;
  const int n_blocks = (min(mask.key_end(m0, kBlockM), reach.y) + kBlockN - 1) / kBlockN;
  const BlockList key_blocks = sparse.keys_of(head, sparse.q_block(m0));
  const int tiles_per_block = sparse.key_tiles_per_block(kBlockN);
  int list_at = key_blocks.count - 1;
  auto taking_part_below = [&](int n) {  // the next block taking part, n down; -1: none
    do n = key_blocks.tile_below(n, n_begin, tiles_per_block, list_at);
    while (n >= 0 && !segments.blocks_meet(m0, kBlockM, n * kBlockN, kBlockN));
    return n;
  };
  const SoftCap softcap = SoftCap::of(p);
  const float softmax_scale = softcap.softmax_scale(p.softmax_scale);
  const float scale_log2 = softmax_scale * 1.4426950408889634f;
  const Alibi alibi = kArrays ? Alibi::of(p, batch, head, softmax_scale) : Alibi{};
  const Dropout dropout = kDropout ? Dropout::of(p, batch, head) : Dropout{};
  auto visible = [&](int q_row, int k_col) {
    return mask.visible(q_row, k_col) && segments.same(q_row, k_col);
  };

  typename K::AccO o;
  o.zero();
  OnlineSoftmax<K::kMT> softmax;

  int n = taking_part_below(n_blocks);
  if (n >= 0) {
    load_tile_async<kThreads>(sQ, q, q_row_stride, sh.seq_q - m0, tid);
    load_tile_async<kThreads>(sK, k + n * kBlockN * kv_row_stride, kv_row_stride,
                              sh.seq_k - n * kBlockN, tid);
    cp_async_commit();
    while (n >= 0) {
      const int n0 = n * kBlockN;
      cp_async_wait<0>();
      __syncthreads();  // K[n] landed; every warp is done with V[n+1]
      load_tile_async<kThreads>(sV, v + n0 * kv_row_stride, kv_row_stride, sh.seq_k - n0, tid);
      cp_async_commit();

      typename K::AccS s;
      s.zero();
      gemm_ss<T, false, false, kD>(s, sQ, warp_m0, sK, 0, lane);
      if (softcap.on()) softcap.apply(s);  // before the mask: tanh(-inf) is -1
      if (alibi.on()) alibi.apply(s, m0 + warp_m0, n0, lane);
      if (mask.tile_needs_mask(m0 + warp_m0, K::kWarpRows, n0, kBlockN) ||
          segments.tile_needs_mask(m0 + warp_m0, K::kWarpRows, n0, kBlockN))
        mask_scores(s, visible, m0 + warp_m0, n0, lane);
      softmax.update(s, o, scale_log2);
      if (dropout.on()) dropout.apply(s, m0 + warp_m0, n0, lane);
      uint32_t p_frags[K::kMT][kBlockN / 16][4];
      accum_to_a_frags<T>(p_frags, s);

      cp_async_wait<0>();
      __syncthreads();  // V[n] landed; every warp is done with K[n]
      const int next = taking_part_below(n);
      if (next >= 0) {
        load_tile_async<kThreads>(sK, k + next * kBlockN * kv_row_stride, kv_row_stride,
                                  sh.seq_k - next * kBlockN, tid);
        cp_async_commit();
      }
      gemm_rs<T, true>(o, p_frags, sV, 0, lane);
      n = next;
    }
  }

  float lse[K::kMT][2];
  softmax.finalize(o, softmax_scale, lse);

  // Epilogue: each thread writes its pairs of columns straight to global memory.
#pragma unroll
  for (int mt = 0; mt < K::kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_m0 + K::AccO::row(mt, 2 * h, lane);
      if (m0 + row >= sh.seq_q) continue;
      T* dst = out + row * q_row_stride;
#pragma unroll
      for (int nt = 0; nt < K::AccO::kNT; ++nt)
        *reinterpret_cast<uint32_t*>(dst + K::AccO::col(nt, 0, lane)) =
            pack2<T>(o.x[mt][nt][2 * h], o.x[mt][nt][2 * h + 1]);
      if ((lane & 3) == 0) lse_out[row] = lse[mt][h];
    }
}

template <typename T, int kD>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using K = FwdKernel<T, kD>;
  auto kernel = extras_of(p) == kAllExtras       ? flash_fwd_kernel<T, kD, kAllExtras>
                : extras_of(p) == kMasksAlibi ? flash_fwd_kernel<T, kD, kMasksAlibi>
                                                 : flash_fwd_kernel<T, kD, kNoExtras>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<K::order(p).grid(), K::kThreads, K::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_flash::sm80
