// FlashAttention backward on Hopper for head_dim 256, between the preprocess
// and dQ-convert passes of bwd_passes.cuh. At this width a warpgroup cannot
// hold dK and dV of 64 keys (256 registers), so the work is split the other
// way. One block per (64-key block, kv head, batch), K and V loaded once by
// TMA, the block walking the query blocks of every query head of its GQA group
// with Q, dO, lse and delta arriving through a ring of kStages buffers
// (bwd_block.cuh, shared with flash_bwd.cuh). Two consumer warpgroups, w = 0, 1:
//   S = Q K^T, dP = dO V^T on keys 32w .. 32w + 31     (wgmma, shared memory)
//   P = exp(S - lse), dS = P (dP - delta)             (registers, rows = queries)
//   P, dS -> shared memory (both warpgroups' halves)
//   dV^T += dO^T P, dK^T += Q^T dS on head-dim rows 128w .. 128w + 127
//   dQ^T  = K^T dS^T on the same rows, added to the fp32 accumulator
// All products read both operands from shared memory; dK/dV stay in registers
// (transposed) for the whole block. The two warpgroups meet twice per step:
// once P/dS are complete, and once both are done reading them. Each finished
// dQ^T goes to shared memory, into the stage's Q and dO panels that only its
// warpgroup's products read, for the dQ adder (bwd_block.cuh), which frees the
// stage once both tiles have left it: L2 takes these bulk additions several
// times faster than the same bytes as per-thread atomics.
#pragma once

#include <cuda_runtime.h>

#include "../common/block_order.cuh"
#include "../common/bwd_passes.cuh"
#include "../common/mask.cuh"
#include "../common/warp_gemm.cuh"
#include "../params.h"
#include "bwd_block.cuh"
#include "hopper.cuh"
#include "tile_sizes.h"
#include "wgmma.cuh"

namespace jax_flash::sm90 {

template <typename T, int kD>
struct BwdWideKernel {
  using Tile = BwdTile<kD>;
  static constexpr int kBlockM = Tile::kBlockM, kStages = Tile::kStages;
  static constexpr int kBlockN = 64;  // two warpgroups of 32 keys for S and dP
  static constexpr int kThreads = 384;
  static constexpr int kPanels = kD / 64;
  static constexpr int kKeysPerWG = kBlockN / 2;  // S and dP columns of one warpgroup
  static constexpr int kRowsPerWG = kD / 2;       // dK^T, dV^T, dQ^T rows of one warpgroup
  static constexpr int kMTiles = kRowsPerWG / 64;
  static constexpr int kKVBytes = kBlockN * kD * 2;
  static constexpr int kQBytes = kBlockM * kD * 2;
  static constexpr int kPBytes = kBlockM * kBlockN * 2;
  static constexpr int kStageBytes = 2 * kQBytes + 1024;  // Q, dO, lse and delta
  static constexpr int kVOffset = kKVBytes;
  static constexpr int kStageOffset = 2 * kKVBytes;
  static constexpr int kPOffset = kStageOffset + kStages * kStageBytes;
  static constexpr int kDSOffset = kPOffset + kPBytes;
  static constexpr int kBarOffset = kDSOffset + kPBytes;
  static constexpr int kDQBarriers = 2 * kStages;  // per stage and warpgroup: dQ^T staged
  static constexpr int kSmemBytes =
      kBarOffset + bwd_smem_tail_bytes(kStages, kDQBarriers) + 1024;  // BwdSmem
  // One block per key block (BwdKeyBlocks), never shared (bwd_split.h).
  static constexpr bool kPersistent = false, kSplits = false;
  static constexpr bool kKVSlots = false;  // KVSlots
  static constexpr int kStageReleases = 2;  // the dQ adder, once per warpgroup's dQ^T

  // The dQ adder's view (bwd_add_dq): warpgroup w's dQ^T panel c is staged in
  // its own Q (c < 2) or dO panels, the ones only its dV^T / dK^T products read.
  static constexpr int kDQPanels = kRowsPerWG / 32;
  static __device__ __forceinline__ void init_dq_barriers(const BwdSmem<BwdWideKernel>& sm) {
    for (int i = 0; i < kDQBarriers; ++i) mbar_init(sm.dq_barrier(i), 4);  // one per warp
  }
  static __device__ __forceinline__ uint32_t dq_full(const BwdSmem<BwdWideKernel>& sm, int step,
                                                     int w) {
    return sm.dq_barrier(2 * (step % kStages) + w);
  }
  static __device__ __forceinline__ uint32_t dq_parity(int step) { return (step / kStages) & 1; }
  static __device__ __forceinline__ uint32_t dq_free(const BwdSmem<BwdWideKernel>& sm, int step,
                                                     int) {
    return sm.empty(step % kStages);
  }
  static __device__ __forceinline__ uint32_t dq_panel(const BwdSmem<BwdWideKernel>& sm, int step,
                                                      int w, int c) {
    return sm.q(step % kStages) + (2 * w + c % 2) * kBlockM * 128 + (c / 2) * kQBytes;
  }
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(register_split_fits<kThreads, 2, kProducerRegs, kConsumerRegs>());
  static_assert(kBlockSparseGranule % kBlockM == 0 && kBlockSparseGranule % kBlockN == 0,
                "a tile must lie in one block of a block-sparse mask");
  static_assert(kSmemBytes <= 227 * 1024);
  static_assert(kBlockN == 64, "P and dS rows are one 128-byte panel of keys");
  static_assert(kBlockM == 64, "dQ^T tiles are 64 queries wide");
  static_assert(kD == 256, "a warpgroup's dQ^T fills its two Q and two dO panels");
  using AccS = Accum<1, kKeysPerWG / 8>;  // 64 queries x 32 keys
  using AccT = Accum<1, 64 / 8>;          // 64 head-dim rows x 64 keys or queries
  static __host__ __device__ TileOrder order(const BwdParams& p) {
    return {(p.shape.seq_k + kBlockN - 1) / kBlockN, p.shape.kv_heads, p.shape.batch, p.causal,
            /*last_tile_longest=*/false};
  }
};

// kSparse: the walk reads a block-sparse mask's lists (never with kDeterministic).
template <typename T, int kD, bool kDeterministic, bool kSparse>
__global__ void __launch_bounds__(BwdWideKernel<T, kD>::kThreads, 1)
    flash_bwd_wide_kernel(const __grid_constant__ BwdArgs args) {
  using K = BwdWideKernel<T, kD>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kStages = K::kStages;
  const BwdParams& p = args.p;
  extern __shared__ uint8_t smem_raw[];
  const BwdSmem<K> sm(smem_raw);
  const uint32_t smem = sm.base, sK = sm.k(), sV = sm.v();
  const uint32_t sP = smem + K::kPOffset, sdS = smem + K::kDSOffset;

  const AttentionShape& sh = p.shape;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warpgroup = warp >> 2;
  const BlockIndex bi = K::order(p).block();
  const BwdWalk walk = BwdWalk::of<kSparse>(p, bi, kBlockM, kBlockN);
  const int kv_head = walk.kv_head, batch = walk.batch, n0 = walk.n0;
  const BwdWalk::Visit first = walk.first();
  const AttentionMask mask = AttentionMask::of(p);

  if (tid == 0) sm.init_barriers();
  __syncthreads();

  if (warpgroup == 0) {
    bwd_producer_warpgroup<K, kDeterministic, kSparse>(args, sm, warp, lane);
    return;
  }

  regs_grow<K::kConsumerRegs>();
  const int consumer = warpgroup - 1;
  const float scale_log2 = p.softmax_scale * kLog2e;
  const int key0 = consumer * K::kKeysPerWG;  // this warpgroup's S / dP columns
  const int d0 = consumer * K::kRowsPerWG;    // its dK^T / dV^T / dQ^T rows
  // This thread's two query rows of S / dP within the step's block.
  const int q_row0 = (warp & 3) * 16 + (lane >> 2);

  typename K::AccT dkt[K::kMTiles], dvt[K::kMTiles], dqt[K::kMTiles];
#pragma unroll
  for (int mt = 0; mt < K::kMTiles; ++mt) {
    dkt[mt].zero();
    dvt[mt].zero();
  }
  auto regs = [](typename K::AccT& acc) -> float(&)[32] { return flat<32>(acc); };

  // Named barriers of both warpgroups: 1, P and dS of the step complete; 2, at
  // the next step, both done with the previous step's products (which read them).
  constexpr int kPdsReady = 1, kPdsFree = 2;

  if (!first.done()) mbar_wait(sm.full_kv(), 0);
  int step = 0;
  for (BwdWalk::Visit visit = first; !visit.done(); visit = walk.next(visit), ++step) {
    const int s = step % kStages, m0 = walk.m0(visit);
    mbar_wait(sm.full(s), (step / kStages) & 1);
    const float* stats = sm.stats(s);
    const float lse[2] = {stats[q_row0], stats[q_row0 + 8]};
    const float delta[2] = {stats[kBlockM + q_row0], stats[kBlockM + q_row0 + 8]};

    // S and dP on this warpgroup's 32 keys (rows = queries, K-major operands).
    typename K::AccS st, dpt;
    auto& s_regs = flat<K::AccS::kNT * 4>(st);
    auto& dp_regs = flat<K::AccS::kNT * 4>(dpt);
    wgmma_fence();
    wgmma_over_head_dim<T, K::kKeysPerWG, kD, kBlockM, kBlockN>(
        s_regs, sw128_desc(sm.q(s), 16), sw128_desc(sK + key0 * 128, 16));
    wgmma_over_head_dim<T, K::kKeysPerWG, kD, kBlockM, kBlockN>(
        dp_regs, sw128_desc(sm.dout(s), 16), sw128_desc(sV + key0 * 128, 16));

    wgmma_wait<1>();
    pin_registers(s_regs);
    // The mask in a loop of its own: a branch between exponentials makes each
    // wait for the previous one's result.
#pragma unroll
    for (int nt = 0; nt < K::AccS::kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        st.x[0][nt][i] = fast_exp2(fmaf(st.x[0][nt][i], scale_log2, -lse[i >> 1]));
    if (mask.tile_needs_mask(m0, kBlockM, n0, kBlockN)) {
#pragma unroll
      for (int nt = 0; nt < K::AccS::kNT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          st.x[0][nt][i] =
              mask.visible(m0 + q_row0 + 8 * (i >> 1), n0 + key0 + K::AccS::col(nt, i, lane))
                  ? st.x[0][nt][i]
                  : 0.f;
    }
    wgmma_wait<0>();
    pin_registers(dp_regs);
#pragma unroll
    for (int nt = 0; nt < K::AccS::kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        dpt.x[0][nt][i] = st.x[0][nt][i] * (dpt.x[0][nt][i] - delta[i >> 1]);

    // P and dS -> shared memory, rows = queries, 128-byte rows of the block's 64
    // keys, swizzled: the layout the products below read (keys as n or k).
    if (step > 0) named_barrier_sync(kPdsFree, 256);
#pragma unroll
    for (int nt = 0; nt < K::AccS::kNT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = q_row0 + 8 * h;
        const int chunk = (key0 + nt * 8) / 8;
        const uint32_t off = row * 128 + ((chunk ^ (row & 7)) << 4) + (lane & 3) * 4;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sP + off),
                     "r"(pack2<T>(st.x[0][nt][2 * h], st.x[0][nt][2 * h + 1])));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sdS + off),
                     "r"(pack2<T>(dpt.x[0][nt][2 * h], dpt.x[0][nt][2 * h + 1])));
      }
    fence_async_shared();
    named_barrier_sync(kPdsReady, 256);

    // dV^T += dO^T P and dK^T += Q^T dS: m = head-dim rows (A = dO / Q read
    // M-major, one 64-column panel per m tile), n = keys (B = P / dS read
    // N-major), k = queries.
    wgmma_fence();
#pragma unroll
    for (int mt = 0; mt < K::kMTiles; ++mt) {
      const uint32_t panel = (d0 / 64 + mt) * kBlockM * 128;
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk)
        Wgmma<T, 64>::template ss<1, 1>(regs(dvt[mt]),
                                        sw128_desc(sm.dout(s) + panel + kk * 2048, kBlockM * 128),
                                        sw128_desc(sP + kk * 2048, K::kPBytes), 1);
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk)
        Wgmma<T, 64>::template ss<1, 1>(regs(dkt[mt]),
                                        sw128_desc(sm.q(s) + panel + kk * 2048, kBlockM * 128),
                                        sw128_desc(sdS + kk * 2048, K::kPBytes), 1);
    }
    wgmma_commit();
    // dQ^T = K^T dS^T: m = head-dim rows (A = K read M-major), n = queries (B =
    // dS read K-major: its rows are queries, keys along them), k = keys.
#pragma unroll
    for (int mt = 0; mt < K::kMTiles; ++mt) {
      const uint32_t panel = (d0 / 64 + mt) * kBlockN * 128;
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        Wgmma<T, 64>::template ss<1, 0>(regs(dqt[mt]),
                                        sw128_desc(sK + panel + kk * 2048, kBlockN * 128),
                                        sw128_desc(sdS + kk * 32, 16), kk > 0);
    }
    wgmma_commit();

    wgmma_wait<0>();
#pragma unroll
    for (int mt = 0; mt < K::kMTiles; ++mt) {
      pin_registers(regs(dvt[mt]));
      pin_registers(regs(dkt[mt]));
      pin_registers(regs(dqt[mt]));
    }

    // dQ^T -> shared memory as the accumulator's layout wants it: panels of 32
    // head-dim columns (fp32, 128-byte rows = queries, swizzled), for the dQ
    // adder. This warpgroup's own products were the last readers of those
    // panels; the other's S and dP were done before kPdsReady.
#pragma unroll
    for (int mt = 0; mt < K::kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < K::AccT::kNT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int d = mt * 64 + (warp & 3) * 16 + K::AccT::row(0, i, lane);
          const int q = K::AccT::col(nt, i, lane), col = d % 32;
          const uint32_t addr = K::dq_panel(sm, step, consumer, d / 32) + q * 128 +
                                (((col / 4) ^ (q & 7)) << 4) + (col % 4) * 4;
          asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(dqt[mt].x[0][nt][i]));
        }
    fence_async_shared();
    __syncwarp();
    if (lane == 0) mbar_arrive(K::dq_full(sm, step, consumer));
  }

  // Epilogue: dK^T and dV^T (rows = head dim, columns = keys) written
  // transposed; dK picks up the softmax scale here.
  const int64_t kv_row_stride = int64_t(sh.kv_heads) * kD;
  const int64_t kv_offset = (int64_t(batch) * sh.seq_k + n0) * kv_row_stride + kv_head * kD;
  T* dk_out = static_cast<T*>(p.dk) + kv_offset;
  T* dv_out = static_cast<T*>(p.dv) + kv_offset;
#pragma unroll
  for (int mt = 0; mt < K::kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < K::AccT::kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int d = d0 + mt * 64 + (warp & 3) * 16 + K::AccT::row(0, i, lane);
        const int key = K::AccT::col(nt, i, lane);
        if (n0 + key >= sh.seq_k) continue;
        dk_out[key * kv_row_stride + d] = static_cast<T>(dkt[mt].x[0][nt][i] * p.softmax_scale);
        dv_out[key * kv_row_stride + d] = static_cast<T>(dvt[mt].x[0][nt][i]);
      }
}

template <typename T, int kD>
cudaError_t launch_bwd_wide(const BwdParams& p, cudaStream_t stream) {
  return launch_bwd_passes<T, kD, BwdWideKernel<T, kD>>(
      [](auto det, auto sparse) {
        return flash_bwd_wide_kernel<T, kD, decltype(det)::value, decltype(sparse)::value>;
      },
      p, stream);
}

}  // namespace jax_flash::sm90
