// FlashAttention backward on Hopper, between the preprocess and dQ-convert
// passes of bwd_passes.cuh. With a block-sparse mask a persistent kernel:
// each block takes key blocks (128 keys of a kv head and batch) in turn
// (BwdKeyBlocks, kPersistentBwd); otherwise one block per key block, except
// that non-causal key blocks of a last, partly idle wave are shared by several
// blocks, each taking a run of their query blocks (bwd_split.h). For each,
// K and V are loaded once by TMA; the block walks the query blocks of
// every query head of its GQA group (so the group's dK/dV are summed in
// registers), with Q and dO arriving by TMA and lse/delta by one producer warp
// through a ring of kStages buffers. Two consumer warpgroups each own 64 of the keys:
//   S^T = K Q^T, dP^T = V dO^T          (wgmma, both operands in shared memory)
//   P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta)          (registers)
//   dV += P^T dO, dK += dS^T Q          (wgmma, P^T / dS^T from registers)
//   dQ += dS K                          (dS^T of both warpgroups via shared
//                                        memory; each computes half of dQ's
//                                        columns into shared memory, for the
//                                        dQ adder of bwd_block.cuh)
// Causal query blocks that cannot see the key block, and those a block-sparse
// mask has off, are skipped, not masked.
// A deterministic backward adds dQ in key-block order (dq_turns.cuh).
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
struct BwdKernel {
  using Tile = BwdTile<kD>;
  static constexpr int kBlockM = Tile::kBlockM, kStages = Tile::kStages;
  static constexpr int kBlockN = 128;  // two consumer warpgroups of 64 keys
  static constexpr bool kPersistent = true;
  // Blocks of threads take key blocks through BwdSplit (bwd_split.h): the
  // dense backward shares the last wave's non-causal key blocks, whose fp32
  // dK/dV sums take kSplitSlotFloats each.
  static constexpr bool kSplits = true;
  static constexpr int kSplitSlotFloats = 2 * kBlockN * kD;
  static constexpr int kThreads = 384;
  static constexpr int kPanels = kD / 64;
  static constexpr int kKVBytes = kBlockN * kD * 2;
  static constexpr int kQBytes = kBlockM * kD * 2;
  static constexpr int kDSBytes = kBlockN * kBlockM * 2;
  static constexpr int kDQBytes = kBlockM * kD * 4;  // a step's dQ, fp32
  static constexpr int kDSBuffers = 3;  // see the dS^T store
  static constexpr int kQTiles = kBlockM / 64;  // m64 tiles of a step's queries (dQ)
  // Shared memory: K, V, the stages (Q, dO, lse, delta), the dS^T buffers, dQ, barriers.
  static constexpr int kStageBytes = 2 * kQBytes + 1024;
  static_assert(8 * kBlockM <= 1024, "lse and delta of a stage");
  static constexpr int kVOffset = kKVBytes;
  static constexpr int kStageOffset = 2 * kKVBytes;
  static constexpr int kDSOffset = kStageOffset + kStages * kStageBytes;
  static constexpr int kDQOffset = kDSOffset + kDSBuffers * kDSBytes;
  static constexpr int kBarOffset = kDQOffset + kDQBytes;
  static constexpr int kDQBarriers = 4;  // per warpgroup: its dQ tile staged, then read
  // The epilogue's transposes (store_grad_rows): 512 bytes per consumer warp,
  // in a region of their own where it fits (head_dim 128), else in the first 2
  // KB of the warpgroup's 64 rows of V, which only its dP^T products read: each
  // warp waits for its last one before the named barrier of the trailing dQ
  // product, which all four pass before any starts the epilogue (head_dim 64:
  // the K/V release then follows the epilogue).
  static constexpr int kTailEnd = kBarOffset + bwd_smem_tail_bytes(kStages, kDQBarriers);
  static constexpr int kEpilogueOffset = (kTailEnd + 127) / 128 * 128;
  static constexpr int kEpilogueBytes = 8 * 512;
  static constexpr bool kEpilogueOwnSmem = kEpilogueOffset + kEpilogueBytes + 1024 <= kMaxSmemBytes;
  static constexpr int kUsedBytes = kEpilogueOwnSmem ? kEpilogueOffset + kEpilogueBytes : kTailEnd;
  // Persistent blocks rotate K/V and the dS^T buffers through four slots
  // (KVSlots) where K and V together are the size of a dS^T buffer (head_dim
  // 64): slot 0 is K/V's place, slots 1-3 the dS^T buffers'.
  static constexpr bool kKVSlots = 2 * kKVBytes == kDSBytes;
  static_assert(!kKVSlots || (kStages == 2 && kDSBuffers == 3 && kVOffset == kKVBytes),
                "KVSlots: a slot's last dQ product is done two steps on");
  static __device__ __forceinline__ uint32_t slot(uint32_t base, int i) {
    return i == 0 ? base : base + kDSOffset + (i - 1) * kDSBytes;
  }
  // Up to 1024 bytes more to align the base (BwdSmem), as far as the limit
  // allows; the kernel checks that its base fits (in practice the dynamic shared
  // memory starts 1024-aligned).
  static constexpr int kSmemBytes =
      kUsedBytes + 1024 <= kMaxSmemBytes ? kUsedBytes + 1024 : kMaxSmemBytes;
  static_assert(kUsedBytes <= kMaxSmemBytes);
  static constexpr int kStageReleases = 8;  // one per consumer warp
  static constexpr int kProducerRegs = Tile::kProducerRegs, kConsumerRegs = Tile::kConsumerRegs;
  static_assert(kBlockSparseGranule % kBlockM == 0 && kBlockSparseGranule % kBlockN == 0,
                "a tile must lie in one block of a block-sparse mask");
  static_assert(register_split_fits<kThreads, 2, kProducerRegs, kConsumerRegs>());
  static constexpr int kDQCols = kD / 2;  // each warpgroup's share of dQ
  using AccS = Accum<1, kBlockM / 8>;
  using AccKV = Accum<1, kD / 8>;
  using AccQ = Accum<1, kDQCols / 8>;  // one per m64 tile of queries
  // The lse and delta of a thread's queries in registers for the whole step
  // (see the loop); at 128 queries they would take 64 registers.
  static constexpr bool kStatsInRegisters = kBlockM == 64;

  // The dQ adder's view (bwd_add_dq): each warpgroup has one dQ buffer in
  // shared memory, panel c of warpgroup w at panel w kDQPanels + c.
  static constexpr int kDQPanels = kDQCols / 32;
  static __device__ __forceinline__ void init_dq_barriers(const BwdSmem<BwdKernel>& sm) {
    for (int w = 0; w < 2; ++w) {
      mbar_init(sm.dq_barrier(w), 4);      // staged: one arrival per warp
      mbar_init(sm.dq_barrier(2 + w), 1);  // read out: the adder
    }
  }
  static __device__ __forceinline__ uint32_t dq_full(const BwdSmem<BwdKernel>& sm, int, int w) {
    return sm.dq_barrier(w);
  }
  static __device__ __forceinline__ uint32_t dq_parity(int step) { return step & 1; }
  static __device__ __forceinline__ uint32_t dq_free(const BwdSmem<BwdKernel>& sm, int, int w) {
    return sm.dq_barrier(2 + w);
  }
  static __device__ __forceinline__ uint32_t dq_panel(const BwdSmem<BwdKernel>& sm, int, int w,
                                                      int c) {
    return sm.base + kDQOffset + (w * kDQPanels + c) * kBlockM * 128;
  }
  static __host__ __device__ TileOrder order(const BwdParams& p) {
    return {(p.shape.seq_k + kBlockN - 1) / kBlockN, p.shape.kv_heads, p.shape.batch, p.causal,
            /*last_tile_longest=*/false};
  }
};

// Writes rows Acc::row(0, 2 h, lane) of a dK or dV accumulator, times `scale`,
// as T: `dst` is this lane's row at column 0 (16-byte aligned) and `store`
// whether the lane writes it. Every 4 mma tiles' columns go through the warp's
// 512 bytes at `scratch` (stmatrix, then rows of 64 bytes read back 16 bytes
// a lane; the 16-byte chunks XOR-swizzled by row / 2 so that neither side has
// bank conflicts), so that each lane writes 8 adjacent columns with one
// 16-byte store instead of 4 stores of a pair. Shuffles would transpose without
// shared memory, but in this kernel ptxas then guards its warp-wide
// instructions against divergence and moves the wgmma descriptors out of the
// uniform registers (the dense backward measured 12% slower). Without
// `steps` (a key block that visits no query block) the rows are zeros. With
// `proxy_fence` the last transpose ends with a proxy fence: the scratch's bytes
// are next written by TMA (head_dim 64, where it lies in V), and the PTX memory
// model orders generic writes before async-proxy ones only through it.
template <typename T, typename Acc>
__device__ __forceinline__ void store_grad_rows(T* dst, const Acc& acc, int h, float scale,
                                                bool steps, bool store, uint32_t scratch,
                                                int lane, bool proxy_fence = false) {
  static_assert(Acc::kNT % 4 == 0, "16-byte stores take 4 mma tiles' columns");
  const int row = lane >> 2, chunk = lane & 3;
  const uint32_t st_addr = scratch + (lane & 7) * 64 + (((lane >> 3) ^ ((lane >> 1) & 3)) * 16);
  const uint32_t ld_addr = scratch + row * 64 + ((chunk ^ ((row >> 1) & 3)) * 16);
#pragma unroll
  for (int g = 0; g < Acc::kNT / 4; ++g) {
    uint4 v = make_uint4(0, 0, 0, 0);
    if (steps) {
      uint32_t pairs[4];  // matrix j: mma tile 4 g + j
#pragma unroll
      for (int j = 0; j < 4; ++j)
        pairs[j] = pack2<T>(acc.x[0][4 * g + j][2 * h] * scale,
                            acc.x[0][4 * g + j][2 * h + 1] * scale);
      stmatrix_x4(st_addr, pairs);
      __syncwarp();
      v = ld_shared_v4(ld_addr);
      if (proxy_fence && g == Acc::kNT / 4 - 1) fence_async_shared();
      __syncwarp();
    }
    if (store) *reinterpret_cast<uint4*>(dst + g * 32 + chunk * 8) = v;
  }
}

// kDeterministic: dQ additions in key-block order (p.dq_turns is set). A
// template flag, since the turn-taking code costs the plain kernel registers.
// kSparse: the walk reads a block-sparse mask's lists (never with kDeterministic).
template <typename T, int kD, bool kDeterministic, bool kSparse>
__global__ void __launch_bounds__(BwdKernel<T, kD>::kThreads, 1)
    flash_bwd_kernel(const __grid_constant__ BwdArgs args) {
  using K = BwdKernel<T, kD>;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kStages = K::kStages;
  const BwdParams& p = args.p;
  extern __shared__ uint8_t smem_raw[];
  const BwdSmem<K> sm(smem_raw);
  const uint32_t smem = sm.base, sK = sm.k(), sV = sm.v();
  auto sdS = [&](int b) { return smem + K::kDSOffset + b * K::kDSBytes; };

  const AttentionShape& sh = p.shape;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warpgroup = warp >> 2;
  const AttentionMask mask = AttentionMask::of(p);

  if (tid == 0) {
    if (sm.base + K::kUsedBytes > smem_u32(smem_raw) + K::kSmemBytes) __trap();
    sm.init_barriers();
  }
  __syncthreads();

  if (warpgroup == 0) {
    bwd_producer_warpgroup<K, kDeterministic, kSparse>(args, sm, warp, lane);
    return;
  }

  regs_grow<K::kConsumerRegs>();
  const int consumer = warpgroup - 1;
  const int key_row0 = consumer * 64 + (warp & 3) * 16;  // this warp's first key in the block
  const float scale_log2 = p.softmax_scale * kLog2e;

  typename K::AccKV dk, dv;
  auto& dk_regs = flat<K::AccKV::kNT * 4>(dk);
  auto& dv_regs = flat<K::AccKV::kNT * 4>(dv);

  // Descriptors at k step 0 (later steps add their byte offset / 16).
  //   K-major, rows = this warpgroup's keys: K and V for S^T and dP^T.
  //   N-major, rows = all 128 keys, columns = this warpgroup's dQ columns: K for dQ.
  // Under KVSlots they move with each key block's K/V slot.
  constexpr bool kSlots = kPersistentBwd<K, kDeterministic, kSparse> && K::kKVSlots;
  const uint32_t dq_col_offset = K::kDQCols >= 64
                                     ? consumer * (K::kDQCols / 64) * kBlockN * 128
                                     : consumer * K::kDQCols * 2;
  uint64_t k_rows_desc, v_rows_desc, k_cols_desc;
  auto point_at_kv = [&](uint32_t k_smem) {
    k_rows_desc = sw128_desc(k_smem + consumer * 64 * 128, 16);
    v_rows_desc = sw128_desc(k_smem + (sV - sK) + consumer * 64 * 128, 16);
    k_cols_desc = sw128_desc(k_smem + dq_col_offset, kBlockN * 128);
  };
  uint32_t kv_smem = sK;  // this key block's K/V
  point_at_kv(kv_smem);
  KVSlots slots;
  // The dS^T buffer of global step g, local step j of its key block.
  auto ds_buffer = [&](int g, int j) {
    return kSlots ? K::slot(smem, slots.ds(j)) : sdS((g + K::kDSBuffers) % K::kDSBuffers);
  };

  // Named barriers between the consumer warpgroups: 1 + 3 w + step % 3 says
  // that warpgroup w's dS^T rows of a step are in shared memory (w arrives, the
  // other waits, in the next step; w may arrive for two more steps before the
  // other has waited, since its turns at the tensor cores keep it at most a
  // step ahead). 9 and 10 hold the turns.
  auto ds_ready = [](int wg, int step) { return 1 + 3 * wg + step % 3; };
  constexpr int kKVSlotsBarrier = 7;  // both warpgroups at a key block's start (KVSlots)

  // dQ[:, this warpgroup's columns] of step g (counted over every key block
  // of this block of threads) = dS K over all 128 keys, once the other
  // warpgroup's dS^T rows are in shared memory too. At a key block's first
  // step a product of whatever the buffer holds is issued and discarded
  // (`real` false): a product issued on only some paths of the loop would make
  // ptxas serialize every wgmma.
  typename K::AccQ dq[K::kQTiles];
  auto dq_regs = [&](int mq) -> auto& { return flat<K::AccQ::kNT * 4>(dq[mq]); };
  auto issue_dq = [&](int g, uint32_t ds_buf, bool real) {
    if (real) named_barrier_sync(ds_ready(1 - consumer, g), 256);
    wgmma_fence();
#pragma unroll
    for (int mq = 0; mq < K::kQTiles; ++mq) {
      const uint64_t ds_desc = sw128_desc(ds_buf + mq * kBlockN * 128, kBlockN * 128);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        Wgmma<T, K::kDQCols>::template ss<1, 1>(dq_regs(mq), ds_desc + ((kk * 2048) >> 4),
                                                k_cols_desc + ((kk * 2048) >> 4), kk > 0);
    }
    wgmma_commit();
  };
  auto pin_dq = [&] {
#pragma unroll
    for (int mq = 0; mq < K::kQTiles; ++mq) pin_registers(dq_regs(mq));
  };
  // The finished dQ of step g -> this warpgroup's dQ buffer (fp32 in panels of
  // 32 columns, 128-byte rows, swizzled), once the dQ adder has read out the
  // previous step's.
  auto stage_dq = [&](int g) {
    if (g > 0) mbar_wait(K::dq_free(sm, g - 1, consumer), K::dq_parity(g - 1));
#pragma unroll
    for (int mq = 0; mq < K::kQTiles; ++mq)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = mq * 64 + (warp & 3) * 16 + K::AccQ::row(0, 2 * h, lane);
#pragma unroll
        for (int nt = 0; nt < K::AccQ::kNT; ++nt) {
          const int col = K::AccQ::col(nt, 0, lane);
          const uint32_t addr = K::dq_panel(sm, g, consumer, col / 32) + row * 128 +
                                ((((col % 32) / 4) ^ (row & 7)) << 4) + (col % 4) * 4;
          asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr),
                       "f"(dq[mq].x[0][nt][2 * h]), "f"(dq[mq].x[0][nt][2 * h + 1]));
        }
      }
    fence_async_shared();
    __syncwarp();
    if (lane == 0) mbar_arrive(K::dq_full(sm, g, consumer));
  };

  // dV += P^T dO and dK += dS^T Q of the step whose Q/dO are in stage `s`
  // (N-major: rows of dO / Q are the k dim).
  uint32_t p_frags[1][kBlockM / 16][4], ds_frags[1][kBlockM / 16][4];
  auto issue_dkdv = [&](int s) {
    const uint64_t do_n_desc = sw128_desc(sm.dout(s), kBlockM * 128);
    const uint64_t q_n_desc = sw128_desc(sm.q(s), kBlockM * 128);
    pin_registers(dv_regs);
    pin_registers(dk_regs);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
      Wgmma<T, kD>::template rs<1>(dv_regs, p_frags[0][kk], do_n_desc + ((kk * 2048) >> 4), 1);
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
      Wgmma<T, kD>::template rs<1>(dk_regs, ds_frags[0][kk], q_n_desc + ((kk * 2048) >> 4), 1);
    wgmma_commit();
  };
  auto release = [&](int s) {
    __syncwarp();
    if (lane == 0) mbar_arrive(sm.empty(s));
  };

  // The consumer warpgroups take turns at the tensor cores, a turn issuing
  // S^T(t) and dP^T(t), so that one warpgroup's elementwise work runs while
  // the other's products do. dV/dK(t) follow the elementwise work, and with
  // them dQ(t - 1), whose dS^T rows of the other warpgroup have long been in
  // shared memory: waiting for this step's would keep the two in step. (At a
  // key block's first step, dQ(t - 1) is computed and discarded: a product
  // issued on only some paths of the loop would make ptxas serialize every
  // wgmma.) The last step's dQ follows the loop, and with it each warp
  // releases K and V for the next key block's loads, then writes dK and dV
  // while those land.
  // As few values as possible live across the steps: the consumers' registers
  // are all taken (spills there cost every step).
  const TensorCoreTurns<2, 9> turns{consumer};
  constexpr bool kSplitBuild = K::kSplits && !kDeterministic && !kSparse;  // bwd_split.h

  int gstep = 0, kv_loads = 0;  // steps and K/V loads of every key block so far
  // This key block's K and V free again, for the next K/V load (lane 0 of each warp).
  auto arrive_kv_free = [&] { mbar_arrive(sm.empty_kv(kSlots ? (kv_loads - 1) & 1 : 0)); };
  for (BwdKeyBlocks<K, kPersistentBwd<K, kDeterministic, kSparse>> blocks(args, sm); blocks.more();
       blocks.next()) {
    const int n0 = blocks.block().tile * kBlockN;
    // The steps' query blocks come with their stages (BwdSmem::visit).
    bool last = blocks.template empty<kSparse>();
    dk.zero();
    dv.zero();
    if (!last) {
      if (kv_loads == 0) turns.begin();
      if constexpr (kSlots)
        mbar_wait(sm.full_kv(kv_loads & 1), (kv_loads >> 1) & 1);
      else
        mbar_wait(sm.full_kv(), kv_loads & 1);
      ++kv_loads;
      if constexpr (kSlots) {
        kv_smem = K::slot(smem, slots.kv);
        point_at_kv(kv_smem);
        // The previous key block's last dQ products (the other warpgroup's
        // too) read slots this one's first steps write: K/V landing no
        // longer waits for them.
        named_barrier_sync(kKVSlotsBarrier, 256);
      }
    }
    bool later = false;  // past this key block's first step
    int local = 0;       // this key block's steps so far
    while (!last) {
      const int s = gstep % kStages;
      mbar_wait(sm.full(s), (gstep / kStages) & 1);
      const int2 visit = *sm.visit(s);
      const int m0 = visit.x;
      last = visit.y;
      // The lse of this thread's queries, read before the products start (and
      // delta before the exponentials): a shared-memory load issued while the
      // products run waits behind their operand reads for hundreds of cycles.
      // The deterministic kernel, with fewer registers to spare, reads lse with
      // delta.
      const float* stats = sm.stats(s);
      float2 lse[K::AccS::kNT], delta[K::AccS::kNT];
      auto read_lse = [&] {
#pragma unroll
        for (int nt = 0; nt < K::AccS::kNT; ++nt)
          lse[nt] = *reinterpret_cast<const float2*>(stats + K::AccS::col(nt, 0, lane));
      };
      if constexpr (K::kStatsInRegisters && !kDeterministic) read_lse();
      turns.wait();

      // S^T and dP^T, rows = keys, cols = queries.
      typename K::AccS st, dpt;
      auto& st_regs = flat<K::AccS::kNT * 4>(st);
      auto& dpt_regs = flat<K::AccS::kNT * 4>(dpt);
      const uint64_t q_desc = sw128_desc(sm.q(s), 16), do_desc = sw128_desc(sm.dout(s), 16);
      wgmma_fence();
      wgmma_over_head_dim<T, kBlockM, kD, kBlockN, kBlockM>(st_regs, k_rows_desc, q_desc);
      wgmma_over_head_dim<T, kBlockM, kD, kBlockN, kBlockM>(dpt_regs, v_rows_desc, do_desc);
      turns.pass();

      // P^T while dP^T is still being computed.
      const bool need_mask = mask.tile_needs_mask(m0, kBlockM, n0, kBlockN);
      wgmma_wait<1>();
      pin_registers(st_regs);
      if constexpr (K::kStatsInRegisters) {
        if constexpr (kDeterministic) read_lse();
#pragma unroll
        for (int nt = 0; nt < K::AccS::kNT; ++nt)
          delta[nt] = *reinterpret_cast<const float2*>(stats + kBlockM + K::AccS::col(nt, 0, lane));
      }
      // The mask in a loop of its own: a branch between exponentials makes each
      // wait for the previous one's result.
#pragma unroll
      for (int nt = 0; nt < K::AccS::kNT; ++nt) {
        if constexpr (!K::kStatsInRegisters)
          lse[nt] = *reinterpret_cast<const float2*>(stats + K::AccS::col(nt, 0, lane));
#pragma unroll
        for (int i = 0; i < 4; ++i)
          st.x[0][nt][i] =
              fast_exp2(fmaf(st.x[0][nt][i], scale_log2, i & 1 ? -lse[nt].y : -lse[nt].x));
      }
      if (need_mask) {
#pragma unroll
        for (int nt = 0; nt < K::AccS::kNT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            st.x[0][nt][i] = mask.visible(m0 + K::AccS::col(nt, i, lane),
                                          n0 + key_row0 + K::AccS::row(0, i, lane))
                                 ? st.x[0][nt][i]
                                 : 0.f;
      }
      wgmma_wait<0>();
      pin_registers(dpt_regs);
#pragma unroll
      for (int nt = 0; nt < K::AccS::kNT; ++nt) {
        if constexpr (!K::kStatsInRegisters)
          delta[nt] = *reinterpret_cast<const float2*>(stats + kBlockM + K::AccS::col(nt, 0, lane));
#pragma unroll
        for (int i = 0; i < 4; ++i)
          dpt.x[0][nt][i] =
              st.x[0][nt][i] * (dpt.x[0][nt][i] - (i & 1 ? delta[nt].y : delta[nt].x));
      }
      accum_to_a_frags<T>(p_frags, st);
      accum_to_a_frags<T>(ds_frags, dpt);

      // dS^T -> shared memory (rows = keys, 128-byte rows of 64 queries, swizzled;
      // a panel of kBlockN rows per 64 queries), where the dQ product reads it as
      // an M-major operand. The buffer was last
      // read by dQ(gstep - 3), which both warpgroups waited for in gstep - 2:
      // this one itself, the other before passing its turn of gstep - 1 (and
      // by the discarded product of a key block's first step, at gstep - 2).
      const uint32_t ds_buf = ds_buffer(gstep, local);
#pragma unroll
      for (int nt = 0; nt < K::AccS::kNT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = key_row0 + K::AccS::row(0, 2 * h, lane);
          const uint32_t addr = ds_buf + (nt / 8) * kBlockN * 128 + row * 128 +
                                (((nt % 8) ^ (row & 7)) << 4) + (lane & 3) * 4;
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr),
                       "r"(ds_frags[0][nt / 2][(nt & 1) * 2 + h]));
        }
      fence_async_shared();
      named_barrier_arrive(ds_ready(consumer, gstep), 256);

      issue_dkdv(s);
      // (At a key block's first step, a product of this step's buffer.)
      issue_dq(gstep - 1, later ? ds_buffer(gstep - 1, local - 1) : ds_buf, later);
      wgmma_wait<0>();
      pin_registers(dv_regs);
      pin_registers(dk_regs);
      pin_dq();
      release(s);
      if (later) stage_dq(gstep - 1);
      later = true;
      ++gstep;
      ++local;
    }
    if (later) {
      issue_dq(gstep - 1, ds_buffer(gstep - 1, local - 1), true);
      wgmma_wait<0>();
      pin_dq();
      // Every product that reads K and V is done: the next key block's may load.
      if constexpr (K::kEpilogueOwnSmem) {
        __syncwarp();
        if (lane == 0) arrive_kv_free();
      }
      stage_dq(gstep - 1);
      if constexpr (kSlots) slots.next(local);
    }

    // Epilogue: dK picks up the softmax scale here; dV needs none.
    const BlockIndex bi = blocks.block();
    const int kv_head = bi.head, batch = bi.batch;
    const int64_t kv_row_stride = int64_t(sh.kv_heads) * kD;
    const int64_t kv_offset = (int64_t(batch) * sh.seq_k + n0) * kv_row_stride + kv_head * kD;
    T* dk_out = static_cast<T*>(p.dk) + kv_offset;
    T* dv_out = static_cast<T*>(p.dv) + kv_offset;
    const uint32_t scratch =
        (K::kEpilogueOwnSmem ? smem + K::kEpilogueOffset + consumer * 4 * 512
                             : kv_smem + (sV - sK) + consumer * 64 * 128) +
        (warp & 3) * 512;
    // A run of a shared key block (bwd_split.h) adds its partial sums to the
    // key block's, unscaled; a pass after the kernel writes them out.
    const bool shared = kSplitBuild && args.split.shares(blockIdx.x);
    if (shared) {
      float* sums = p.dkv_partials +
                    int64_t(args.split.block_of(blockIdx.x) - args.split.whole) *
                        K::kSplitSlotFloats;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = key_row0 + K::AccKV::row(0, 2 * h, lane);
#pragma unroll
        for (int nt = 0; nt < K::AccKV::kNT; ++nt) {
          const int col = K::AccKV::col(nt, 0, lane);
          atomic_add_f32x2(sums + row * kD + col, dk.x[0][nt][2 * h], dk.x[0][nt][2 * h + 1]);
          atomic_add_f32x2(sums + (kBlockN + row) * kD + col, dv.x[0][nt][2 * h],
                           dv.x[0][nt][2 * h + 1]);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2 && !shared; ++h) {
      const int row = key_row0 + K::AccKV::row(0, 2 * h, lane);
      const bool store = n0 + row < sh.seq_k;
      store_grad_rows(dk_out + row * kv_row_stride, dk, h, p.softmax_scale, later, store, scratch,
                      lane);
      store_grad_rows(dv_out + row * kv_row_stride, dv, h, 1.f, later, store, scratch, lane,
                      /*proxy_fence=*/!K::kEpilogueOwnSmem && h == 1);
    }
    // With the scratch in V, K/V are free only now (a key block without steps
    // loaded none). The transposes' last __syncwarp follows every lane's last
    // scratch access and its proxy fence, so lane 0 releases without another:
    // a __syncwarp here makes ptxas guard the kernel's warp-wide instructions
    // against divergence, as shuffles do.
    if constexpr (!K::kEpilogueOwnSmem)
      if (later && lane == 0) arrive_kv_free();
  }
  if (kv_loads > 0) turns.finish();
}

template <typename T, int kD>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  return launch_bwd_passes<T, kD, BwdKernel<T, kD>>(
      [](auto det, auto sparse) {
        return flash_bwd_kernel<T, kD, decltype(det)::value, decltype(sparse)::value>;
      },
      p, stream);
}

}  // namespace jax_flash::sm90
