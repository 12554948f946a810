// FlashAttention forward on Hopper: TMA, mbarrier pipelines and wgmma.
//
// A persistent kernel: one block per SM walks query tiles of 64 * kConsumers
// rows in TileOrder (under a causal mask: longest first within chunks of
// heads), claiming each next tile at run time, in three roles. Warpgroup 0 is
// the producer: it shrinks to a few registers; one thread claims tiles and
// another issues the TMA copies, each tile's Q (through kQBuffers buffers) and
// then its K and V tiles through a ring of kStages buffers that runs on from
// tile to tile. Every buffer has a "full" barrier (bytes landed) and an "empty"
// one (every consumer warp is done with it). The other warpgroups are
// consumers with the registers the producer gave up: S = Q K^T with both
// operands in shared memory, mask and online softmax in registers, then
// O += P V with P straight from registers; each writes its rows of O from
// registers and moves on. Key blocks are visited from last to first, so the
// masked ones come first, and a warpgroup passes those that none of its rows
// see; with a block-sparse mask only those of the blocks it has on.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "../common/alibi.cuh"
#include "../common/block_order.cuh"
#include "../common/block_sparse.cuh"
#include "../common/mask.cuh"
#include "../common/segments.cuh"
#include "../common/softcap.cuh"
#include "../common/softmax.cuh"
#include "../common/warp_gemm.cuh"
#include "../params.h"
#include "hopper.cuh"
#include "host.h"
#include "tile_sizes.h"
#include "wgmma.cuh"

namespace jax_flash::sm90 {

struct FwdArgs {
  CUtensorMap q, k, v;
  FwdParams p;
};

// The forward's builds, by the arrays a call reads (they cost registers even
// when off): none; segment ids and ALiBi slopes; a block-sparse mask; a
// block-sparse mask with segment ids or ALiBi slopes.
enum class FwdArrays { kNone, kMasks, kBlockSparse, kBlockSparseMasks };

template <typename T, int kD, FwdArrays kArrays = FwdArrays::kNone>
struct FwdKernel {
  using Tile = FwdTile<kD>;
  static constexpr int kBlockN = Tile::kBlockN, kStages = Tile::kStages;
  static constexpr int kQBuffers = Tile::kQBuffers;
  // A query tile of a block-sparse mask lies in one of its blocks: at most
  // kBlockSparseGranule queries, from a multiple of it.
  static constexpr bool kSparse =
      kArrays == FwdArrays::kBlockSparse || kArrays == FwdArrays::kBlockSparseMasks;
  static constexpr bool kMasks =
      kArrays == FwdArrays::kMasks || kArrays == FwdArrays::kBlockSparseMasks;
  static constexpr int kConsumers =
      kSparse ? std::min(Tile::kConsumers, kBlockSparseGranule / 64) : Tile::kConsumers;
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kPanels = kD / 64;
  static constexpr int kQBytes = kBlockM * kD * 2;
  static constexpr int kKVBytes = kBlockN * kD * 2;
  // Tiles are handed out at run time; the producer announces each through
  // kTileSlots slots of {tile, head, batch, key tiles (block-sparse builds)}.
  static constexpr int kTileSlots = 2;
  // The next tile is claimed once the loads of all but the last kClaimLead key
  // tiles of this one are issued: late enough that blocks which drew short
  // tiles take more, early enough that the claim (an atomic), the next tile's
  // list reads and its first loads land before the consumers run dry. Block-
  // sparse tiles are short (few key tiles per query tile), so they claim
  // earlier.
  static constexpr int kClaimLead = kSparse ? 2 : 0;
  // Shared memory: Q buffers, K stages, V stages, the barriers, the tile slots,
  // each K stage's key tile.
  static constexpr int kKOffset = kQBuffers * kQBytes;
  static constexpr int kVOffset = kKOffset + kStages * kKVBytes;
  static constexpr int kBarOffset = kVOffset + kStages * kKVBytes;
  static constexpr int kBarriers = 2 * kQBuffers + 4 * kStages + 2 * kTileSlots + 1;
  // Block-sparse builds read and write a slot as one 16-byte vector.
  static constexpr int kTileSlotOffset =
      kSparse ? (kBarOffset + 8 * kBarriers + 15) / 16 * 16 : kBarOffset + 8 * kBarriers;
  static constexpr int kStageKeyOffset = kTileSlotOffset + 16 * kTileSlots;
  static constexpr int kSmemBytes = kStageKeyOffset + 4 * kStages + 1024;  // + alignment
  // Registers per thread after reallocation: 24 for the producer, the rest split
  // over the consumers (a multiple of 8, at most 240 for the compiler's sake).
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs =
      std::min(240, (65536 / 128 - kProducerRegs) / kConsumers / 8 * 8);
  static_assert(register_split_fits<kThreads, kConsumers, kProducerRegs, kConsumerRegs>());
  using AccS = Accum<1, kBlockN / 8>;
  using AccO = Accum<1, kD / 8>;
  static_assert(kD % 64 == 0 && kBlockN % 64 == 0, "tiles are whole 64-column panels");
  static_assert(!kSparse || (kBlockSparseGranule % kBlockM == 0 &&
                             kBlockSparseGranule % kBlockN == 0),
                "a tile must lie in one block of a block-sparse mask");
  static __host__ __device__ TileOrder order(const FwdParams& p) {
    return {(p.shape.seq_q + kBlockM - 1) / kBlockM, p.shape.heads, p.shape.batch, p.causal,
            /*last_tile_longest=*/true};
  }
};

template <typename T, int kD, FwdArrays kArrays>
__global__ void __launch_bounds__(FwdKernel<T, kD, kArrays>::kThreads, 1)
    flash_fwd_kernel(const __grid_constant__ FwdArgs args) {
  using K = FwdKernel<T, kD, kArrays>;
  constexpr bool kMasks = K::kMasks;
  constexpr int kBlockM = K::kBlockM, kBlockN = K::kBlockN, kStages = K::kStages;
  const FwdParams& p = args.p;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem = (smem_u32(smem_raw) + 1023) & ~1023u;
  // The n-th Q tile's buffer, its barriers and their phase; K/V stages; tile
  // slots.
  auto sQ = [&](int n) { return smem + n % K::kQBuffers * K::kQBytes; };
  auto sK = [&](int s) { return smem + K::kKOffset + s * K::kKVBytes; };
  auto sV = [&](int s) { return smem + K::kVOffset + s * K::kKVBytes; };
  const uint32_t bars = smem + K::kBarOffset;
  constexpr int kQBars = 2 * K::kQBuffers, kKVBars = kQBars + 4 * kStages;
  auto full_q = [&](int n) { return bars + 8 * (n % K::kQBuffers); };
  auto empty_q = [&](int n) { return bars + 8 * (K::kQBuffers + n % K::kQBuffers); };
  auto q_phase = [](int n) { return uint32_t(n / K::kQBuffers) & 1; };
  auto full_k = [&](int s) { return bars + 8 * (kQBars + s); };
  auto full_v = [&](int s) { return bars + 8 * (kQBars + kStages + s); };
  auto empty_k = [&](int s) { return bars + 8 * (kQBars + 2 * kStages + s); };
  auto empty_v = [&](int s) { return bars + 8 * (kQBars + 3 * kStages + s); };
  auto full_tile = [&](int k) { return bars + 8 * (kKVBars + k % K::kTileSlots); };
  auto empty_tile = [&](int k) {
    return bars + 8 * (kKVBars + K::kTileSlots + k % K::kTileSlots);
  };
  const uint32_t loads_issued = bars + 8 * (kKVBars + 2 * K::kTileSlots);
  auto tile_slot = [&](int k) { return smem + K::kTileSlotOffset + 16 * (k % K::kTileSlots); };
  // A block-sparse walk's key tile in K stage s, written by the TMA thread
  // before the stage's loads and read by the consumers once they have landed
  // (before they free the stage), so that consumers do not walk the mask's
  // lists: that walk's dependent global loads sat between each QK^T and its
  // softmax.
  auto stage_key = [&](int s) { return smem + K::kStageKeyOffset + 4 * s; };
  auto slot_phase = [](int k) { return uint32_t(k / K::kTileSlots) & 1; };

  const AttentionShape& sh = p.shape;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warpgroup = warp >> 2;
  const TileOrder order = K::order(p);
  const AttentionMask mask = AttentionMask::of(p);
  // Key blocks [x, y) hold the keys the tile from m0 of `batch` sees (all
  // before its diagonal under a causal mask, those of its window under a window)
  // and whose segments its queries can reach. (Rows before 0 take no part.)
  auto key_blocks = [&](int m0, const SegmentMask& segments) {
    const int2 reach = segments.key_reach(max(m0, 0), kBlockM + min(m0, 0));
    const int end = (min(mask.key_end(m0, kBlockM), reach.y) + kBlockN - 1) / kBlockN;
    return make_int2(min(max(mask.key_begin(m0), reach.x) / kBlockN, end), end);
  };
  auto segments_of = [&](int batch) {
    return kMasks ? SegmentMask::of(p, batch) : SegmentMask{};
  };
  // Of those, the tiles of the key blocks the block mask has on for the tile
  // from m0 (every one without a mask), walked from last to first by
  // KeyTiles::next.
  const int tiles_per_block =
      K::kSparse ? BlockSparse::of(p, 0).key_tiles_per_block(kBlockN) : 1;
  struct KeyTiles {
    BlockList list;
    int begin, n, at, tiles_per_block;
    __device__ __forceinline__ int next() {
      n = list.tile_below(n, begin, tiles_per_block, at);
      return n;
    }
    // How many tiles the walk yields (before it starts), counted by `lanes`
    // threads from `lane`: the caller sums the counts.
    __device__ __forceinline__ int count(int lane, int lanes) const {
      return list.tiles_within(begin, n, tiles_per_block, lane, lanes);
    }
  };
  auto key_tiles = [&](const BlockIndex& bi, int m0, int2 keys) {
    const BlockSparse sparse = K::kSparse ? BlockSparse::of(p, bi.batch) : BlockSparse{};
    const BlockList list = sparse.keys_of(bi.head, sparse.q_block(m0));
    return KeyTiles{list, keys.x, keys.y, list.count - 1, tiles_per_block};
  };
  // Tiles end at the last query, so that a length that is not a multiple of
  // kBlockM leaves its rows before 0 in the first tile (Q reads them as zeros;
  // nothing writes them): under a causal mask that tile is the shortest, where
  // the rows past the end of a last tile would have cost a whole key row. A
  // block-sparse mask's tiles start at its blocks instead, the rows past the
  // end of the last one read as zeros and not written.
  const int row_pad = K::kSparse ? 0 : order.tiles * kBlockM - sh.seq_q;
  auto tile_m0 = [&](int tile) { return tile * kBlockM - row_pad; };

  if (tid == 0) {
    for (int b = 0; b < K::kQBuffers; ++b) {
      mbar_init(full_q(b), 1);
      mbar_init(empty_q(b), 4 * K::kConsumers);  // one arrival per consumer warp
    }
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_k(s), 1);
      mbar_init(full_v(s), 1);
      mbar_init(empty_k(s), 4 * K::kConsumers);
      mbar_init(empty_v(s), 4 * K::kConsumers);
    }
    for (int k = 0; k < K::kTileSlots; ++k) {
      mbar_init(full_tile(k), 1);
      mbar_init(empty_tile(k), 1 + 4 * K::kConsumers);  // the TMA thread, each consumer warp
    }
    mbar_init(loads_issued, 1);
    mbar_init_fence();
  }
  __syncthreads();

  // The k-th tile of this block, from its slot (batch -1: no more tiles), and
  // under a block-sparse mask how many key tiles it visits (the other builds
  // leave the slot's last word alone).
  auto read_tile = [&](int k, int& sparse_key_tiles) {
    mbar_wait(full_tile(k), slot_phase(k));
    BlockIndex bi;
    if constexpr (K::kSparse)
      asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(bi.tile), "=r"(bi.head), "=r"(bi.batch), "=r"(sparse_key_tiles)
                   : "r"(tile_slot(k))
                   : "memory");
    else
      asm volatile("ld.shared.v2.b32 {%0, %1}, [%3];\n"
                   "ld.shared.b32 %2, [%3 + 8];\n"
                   : "=r"(bi.tile), "=r"(bi.head), "=r"(bi.batch)
                   : "r"(tile_slot(k))
                   : "memory");
    return bi;
  };

  // Every role walks the same tiles and counts the same key blocks: `it` over
  // all key blocks (the K/V ring's stage and phase), `q_tiles` over tiles
  // with work (Q's buffer and phase).
  if (warpgroup == 0) {
    regs_shrink<K::kProducerRegs>();
    if (warp == 1 && (K::kSparse || lane == 0)) {
      // The scheduler: a block's first tile is its own index; each next one
      // is the next unclaimed one of the tile counter (so blocks that drew
      // short tiles take more), claimed once the TMA thread has issued the
      // previous tile's loads but kClaimLead, i.e. when the consumers are
      // within kStages + kClaimLead key tiles of its end. Under a block-sparse
      // mask the whole warp then counts the tile's key tiles (loads from the
      // mask's lists) and puts the count in the slot: the other roles would
      // otherwise each wait for those loads when they start the tile. A block-
      // sparse tile without key tiles has no loads to wait for: the TMA thread
      // reports only those with some (`reports` of them so far), and the next
      // tile is claimed at once.
      int reports = 0;
      bool wait_loads = false;
      for (int k = 0;; ++k) {
        if (K::kSparse ? wait_loads : k > 0)
          mbar_wait(loads_issued, K::kSparse ? reports++ & 1 : (k - 1) & 1);
        int id = int(blockIdx.x);
        if (k > 0 && lane == 0) id = atomicAdd(p.tile_counter, 1) + int(gridDim.x);
        if (K::kSparse) id = __shfl_sync(~0u, id, 0);
        const BlockIndex bi = id < order.count() ? order.at(id) : BlockIndex{0, 0, -1};
        int sparse_key_tiles = 0;
        if (K::kSparse && bi.batch >= 0) {
          const int m0 = tile_m0(bi.tile);
          const KeyTiles tiles = key_tiles(bi, m0, key_blocks(m0, segments_of(bi.batch)));
          sparse_key_tiles = __reduce_add_sync(~0u, tiles.count(lane, 32));
        }
        if (lane == 0) {
          mbar_wait(empty_tile(k), slot_phase(k) ^ 1);
          if constexpr (K::kSparse)
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(tile_slot(k)),
                         "r"(bi.tile), "r"(bi.head), "r"(bi.batch), "r"(sparse_key_tiles)
                         : "memory");
          else
            asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n"
                         "st.shared.b32 [%0 + 8], %3;\n" ::"r"(tile_slot(k)),
                         "r"(bi.tile), "r"(bi.head), "r"(bi.batch)
                         : "memory");
          mbar_arrive(full_tile(k));
        }
        if (bi.batch < 0) break;
        wait_loads = sparse_key_tiles > 0;
      }
    } else if (warp == 0 && lane == 0) {
      tma_prefetch_descriptor(&args.q);
      tma_prefetch_descriptor(&args.k);
      tma_prefetch_descriptor(&args.v);
      int it = 0, q_tiles = 0;
      for (int k = 0;; ++k) {
        int sparse_key_tiles = 0;
        const BlockIndex bi = read_tile(k, sparse_key_tiles);
        mbar_arrive(empty_tile(k));
        if (bi.batch < 0) break;
        const int m0 = tile_m0(bi.tile), kv_head = bi.head / (sh.heads / sh.kv_heads);
        auto load_q = [&] {
          mbar_wait(empty_q(q_tiles), q_phase(q_tiles) ^ 1);
          mbar_arrive_expect_tx(full_q(q_tiles), K::kQBytes);
          tma_load_tile<K::kPanels, kBlockM>(sQ(q_tiles), &args.q, full_q(q_tiles), bi.head,
                                             m0, bi.batch);
          ++q_tiles;
        };
        // A block-sparse tile's Q first, as soon as its slot is read: the
        // walk of the mask's list that finds its key tiles, which Q does not
        // need, would otherwise keep Q from the consumers (its short tiles
        // gave them ~1 us to wait for Q in each).
        if (K::kSparse && sparse_key_tiles > 0) load_q();
        const int2 keys = key_blocks(m0, segments_of(bi.batch));
        KeyTiles tiles = key_tiles(bi, m0, keys);
        const int n_blocks = K::kSparse ? sparse_key_tiles : keys.y - keys.x;
        // With a buffer of its own, Q before the key tiles.
        if (!K::kSparse && K::kQBuffers > 1 && n_blocks > 0) load_q();
        const int claim_after = max(n_blocks - 1 - K::kClaimLead, 0);
        for (int i = 0; i < n_blocks; ++i, ++it) {
          const int n0 = (K::kSparse ? tiles.next() : keys.y - 1 - i) * kBlockN;
          const int s = it % kStages;
          const uint32_t phase = (it / kStages) & 1;
          mbar_wait(empty_k(s), phase ^ 1);
          if (K::kSparse) st_shared_u32(stage_key(s), n0);
          mbar_arrive_expect_tx(full_k(s), K::kKVBytes);
          tma_load_tile<K::kPanels, kBlockN>(sK(s), &args.k, full_k(s), kv_head, n0, bi.batch);
          // With one buffer, Q after the first K: the previous tile's last
          // products may still read Q.
          if (!K::kSparse && K::kQBuffers == 1 && i == 0) load_q();
          mbar_wait(empty_v(s), phase ^ 1);
          mbar_arrive_expect_tx(full_v(s), K::kKVBytes);
          tma_load_tile<K::kPanels, kBlockN>(sV(s), &args.v, full_v(s), kv_head, n0, bi.batch);
          if (K::kClaimLead > 0 && i == claim_after) mbar_arrive(loads_issued);
        }
        if (K::kClaimLead == 0) mbar_arrive(loads_issued);
      }
    }
    return;
  }

  regs_grow<K::kConsumerRegs>();
  const int consumer = warpgroup - 1;
  const int warp_row0 = consumer * 64 + (warp & 3) * 16;  // this warp's first row in a tile
  const SoftCap softcap = SoftCap::of(p);
  const float softmax_scale = softcap.softmax_scale(p.softmax_scale);
  const float scale_log2 = softmax_scale * 1.4426950408889634f;
  // Descriptor of the first Q buffer's k step 0; later steps add their byte
  // offset / 16, the other buffer its own.
  const uint64_t q_desc = sw128_desc(sQ(0) + consumer * 64 * 128, 16);
  const TensorCoreTurns<K::kConsumers> turns{consumer};
  // The end (in key blocks) of the keys this warpgroup's 64 rows of the tile
  // from m0 see: 0 when all its rows lie before 0.
  auto wg_key_blocks_end = [&](int m0) {
    const int r0 = m0 + consumer * 64, first = max(r0, 0);
    return r0 + 64 <= 0 ? 0 : (mask.key_end(first, r0 + 64 - first) + kBlockN - 1) / kBlockN;
  };

  typename K::AccS acc_s;
  typename K::AccO o;
  auto& s_regs = flat<K::AccS::kNT * 4>(acc_s);
  auto& o_regs = flat<K::AccO::kNT * 4>(o);
  float alpha[1][2];
  uint32_t p_frags[1][kBlockN / 16][4];

  // S = Q K^T of ring slot `it` with the q_tile-th Q tile, issued (not waited
  // for). Returns the slot's first key under a block-sparse mask (0 otherwise).
  auto issue_qk = [&](int it, int q_tile) {
    const int s = it % kStages;
    const uint64_t k_desc = sw128_desc(sK(s), 16);
    mbar_wait(full_k(s), (it / kStages) & 1);
    const int n0 = K::kSparse ? ld_shared_u32(stage_key(s)) : 0;
    wgmma_fence();
    wgmma_over_head_dim<T, kBlockN, kD, kBlockM, kBlockN>(
        s_regs, q_desc + (q_tile % K::kQBuffers) * (K::kQBytes >> 4), k_desc);
    return n0;
  };
  // O += P V of ring slot `it`, issued.
  auto issue_pv = [&](int it) {
    const int s = it % kStages;
    const uint64_t v_desc = sw128_desc(sV(s), kBlockN * 128);
    mbar_wait(full_v(s), (it / kStages) & 1);
    pin_registers(o_regs);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      Wgmma<T, kD>::template rs<1>(o_regs, p_frags[0][kk], v_desc + ((kk * 16 * 128) >> 4), 1);
    wgmma_commit();
  };
  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };

  int it = 0, q_tiles = 0;
  bool took_turns = false;
  for (int k = 0;; ++k) {
    int sparse_key_tiles = 0;
    const BlockIndex bi = read_tile(k, sparse_key_tiles);
    release(empty_tile(k));
    if (bi.batch < 0) break;
    const int m0 = tile_m0(bi.tile);
    const SegmentMask segments = segments_of(bi.batch);
    const Alibi alibi = kMasks ? Alibi::of(p, bi.batch, bi.head, softmax_scale) : Alibi{};
    const int2 keys = key_blocks(m0, segments);
    const int n_blocks = K::kSparse ? sparse_key_tiles : keys.y - keys.x;
    const int q0 = m0 + warp_row0;  // this warp's first row (it holds 16)
    // (Rows before 0 take no part.) Segment ids are read only for rows from 0
    // on and keys visible otherwise, hence the short circuits there; without
    // them nothing branches.
    auto visible = [&](int q_row, int k_col) {
      if constexpr (kMasks)
        return q_row < 0 || (mask.visible(q_row, k_col) && segments.same(q_row, k_col));
      else
        return (q_row < 0) | mask.visible(q_row, k_col);
    };
    o.zero();
    OnlineSoftmax<1> softmax;
    // Scores of the i-th key block of this tile (landed in s_regs; its first
    // key `sparse_n0` under a block-sparse mask) -> probabilities in place.
    // Packing them into p_frags waits until no product reads p_frags any more.
    auto softmax_step = [&](int i, int sparse_n0) {
      const int n0 = K::kSparse ? sparse_n0 : (keys.y - 1 - i) * kBlockN;
      if (softcap.on()) softcap.apply(acc_s);  // before the mask: tanh(-inf) is -1
      if (alibi.on()) alibi.apply(acc_s, q0, n0, lane);
      if (mask.tile_needs_mask(q0, 64, n0, kBlockN) ||
          (q0 + 16 > 0 && segments.tile_needs_mask(max(q0, 0), 16 + min(q0, 0), n0, kBlockN)))
        mask_scores(acc_s, visible, q0, n0, lane);
      softmax.update_scores(acc_s, scale_log2, alpha);
    };

    // Software pipeline: while the tensor cores compute S of block i and P V of
    // block i - 1, this warpgroup waits only for S; the softmax of block i then
    // overlaps the P V product (O is rescaled by block i - 1's alpha just before
    // that product is issued). Across warpgroups, TensorCoreTurns lets one issue
    // its products while the others run their softmax.
    if (n_blocks > 0) {
      if (!took_turns) turns.begin();
      took_turns = true;
      // The tile's first key blocks (its last keys) that none of this
      // warpgroup's rows see, under a causal mask or a window, or all of them
      // for rows before 0: the warpgroup passes its turns there and frees the
      // buffers unread, so the others' products and softmax have the SM.
      // (Broadcast from lane 0, so that the compiler sees the loops' bounds as
      // uniform: with a bound it took as divergent it moved the products'
      // descriptors out of uniform registers.)
      const int skip = K::kSparse ? 0
                                  : __shfl_sync(~0u, min(max(keys.y - wg_key_blocks_end(m0), 0),
                                                         n_blocks), 0);
      for (int i = 0; i < skip; ++i) {
        turns.wait();
        turns.pass();
        const int s = (it + i) % kStages;
        const uint32_t phase = ((it + i) / kStages) & 1;
        mbar_wait(full_k(s), phase);
        release(empty_k(s));
        mbar_wait(full_v(s), phase);
        release(empty_v(s));
      }
      mbar_wait(full_q(q_tiles), q_phase(q_tiles));
      if (skip == n_blocks) {
        // Every warpgroup takes n_blocks + 1 turns a tile: this one's last
        // (that of the last P V) passes too.
        turns.wait();
        turns.pass();
        release(empty_q(q_tiles));
      } else {
        turns.wait();
        const int first_n0 = issue_qk(it + skip, q_tiles);
        turns.pass();
        wgmma_wait<0>();
        pin_registers(s_regs);
        release(empty_k((it + skip) % kStages));
        if (skip == n_blocks - 1) release(empty_q(q_tiles));
        softmax_step(skip, first_n0);
        accum_to_a_frags<T>(p_frags, acc_s);
        for (int i = skip + 1; i < n_blocks; ++i) {
          turns.wait();
          const int n0 = issue_qk(it + i, q_tiles);
          OnlineSoftmax<1>::rescale(o, alpha);
          issue_pv(it + i - 1);
          turns.pass();
          wgmma_wait<1>();
          pin_registers(s_regs);
          release(empty_k((it + i) % kStages));
          if (i == n_blocks - 1) release(empty_q(q_tiles));
          softmax_step(i, n0);
          wgmma_wait<0>();
          pin_registers(o_regs);
          release(empty_v((it + i - 1) % kStages));
          accum_to_a_frags<T>(p_frags, acc_s);
        }
        OnlineSoftmax<1>::rescale(o, alpha);
        turns.wait();
        issue_pv(it + n_blocks - 1);
        turns.pass();
        wgmma_wait<0>();
        pin_registers(o_regs);
        release(empty_v((it + n_blocks - 1) % kStages));
      }
      it += n_blocks;
      ++q_tiles;
    }

    float lse[1][2];
    softmax.finalize(o, softmax_scale, lse);

    // Epilogue: the warps write their rows straight to global memory
    // (store_accum_rows), so the next tile's products start right away.
    const int64_t row_stride = int64_t(sh.heads) * kD;
    T* out = static_cast<T*>(p.out) + (int64_t(bi.batch) * sh.seq_q + m0) * row_stride +
             bi.head * kD;
    float* lse_out = p.lse + (int64_t(bi.batch) * sh.heads + bi.head) * sh.seq_q + m0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + K::AccO::row(0, 2 * h, lane);
      const bool store = m0 + row >= 0 && (!K::kSparse || m0 + row < sh.seq_q);
      store_accum_rows(out + row * row_stride, o, h, store, lane);
      if (store && (lane & 3) == 0) lse_out[row] = lse[0][h];
    }
  }
  if (took_turns) turns.finish();
}

template <typename T, int kD, FwdArrays kArrays>
cudaError_t launch_fwd_build(const FwdParams& p, cudaStream_t stream) {
  using K = FwdKernel<T, kD, kArrays>;
  const AttentionShape& sh = p.shape;
  FwdArgs args;
  args.p = p;
  cudaError_t err;
  if ((err = query_tensor_map<T>(&args.q, sh, p.q, K::kBlockM)) != cudaSuccess ||
      (err = key_tensor_map<T>(&args.k, sh, p.k, K::kBlockN)) != cudaSuccess ||
      (err = key_tensor_map<T>(&args.v, sh, p.v, K::kBlockN)) != cudaSuccess)
    return err;
  auto kernel = flash_fwd_kernel<T, kD, kArrays>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmemBytes);
  if (err != cudaSuccess) return err;
  const TileOrder order = K::order(p);
  int sms = 0;
  if ((err = current_device_attribute<cudaDevAttrMultiProcessorCount>(&sms)) != cudaSuccess)
    return err;
  if ((err = cudaMemsetAsync(p.tile_counter, 0, sizeof(int), stream)) != cudaSuccess) return err;
  kernel<<<std::min(order.count(), sms), K::kThreads, K::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  if (p.block_sparse.q_lists != nullptr)
    return p.segments.q_ids != nullptr || p.alibi_slopes != nullptr
               ? launch_fwd_build<T, kD, FwdArrays::kBlockSparseMasks>(p, stream)
               : launch_fwd_build<T, kD, FwdArrays::kBlockSparse>(p, stream);
  if (extras_of(p) != kNoExtras) return launch_fwd_build<T, kD, FwdArrays::kMasks>(p, stream);
  return launch_fwd_build<T, kD, FwdArrays::kNone>(p, stream);
}

}  // namespace jax_flash::sm90
