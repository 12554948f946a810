// What the sm90 backward kernels share: the key blocks a block of threads
// takes and the query blocks each visits, its shared memory (K and V, then a
// ring of stages holding a query block's Q, dO, lse and delta), the producer
// warpgroup that fills that ring, and the producer warp that adds the
// consumers' finished dQ tiles to the fp32 accumulator, and the host code that
// launches a backward.
#pragma once

#include <cuda.h>
#include <math_constants.h>

#include <algorithm>
#include <type_traits>

#include "../common/block_order.cuh"
#include "../common/block_sparse.cuh"
#include "../common/bwd_passes.cuh"
#include "../common/dq_turns.cuh"
#include "../common/mask.cuh"
#include "../params.h"
#include "bwd_split.h"
#include "hopper.cuh"
#include "host.h"

namespace jax_flash::sm90 {

struct BwdArgs {
  CUtensorMap q, k, v, dout, dq_accum;
  BwdParams p;
  BwdSplit split;  // K::kSplits kernels: which key block each block of threads takes
};

// The query blocks of a block of keys: those of every query head of its GQA
// group (so the group's dK/dV are summed in registers), each head's from the
// first one that sees the keys and, with a block-sparse mask, in the blocks it
// has on; of a shared key block (bwd_split.h) only its run's steps. Every role
// walks them alike: first(), then next() until done().
struct BwdWalk {
  struct Visit {
    int g;     // the query head within the group
    int at;    // the position in the head's list of query blocks
    int m;     // the query block; < 0: the walk is over
    int left;  // steps left in the run
    __device__ __forceinline__ bool done() const { return m < 0; }
  };
  int kv_head, batch, n0, group, m_begin, m_end, block_m;
  BlockSparse sparse;  // off unless kSparse
  int k_block, tiles_per_block;
  int begin, left;  // the run's steps: [begin, begin + left); never sparse

  template <bool kSparse>
  __device__ __forceinline__ static BwdWalk of(const BwdParams& p, const BlockIndex& bi,
                                               int block_m, int block_n) {
    const AttentionShape& sh = p.shape;
    BwdWalk w;
    w.kv_head = bi.head;
    w.batch = bi.batch;
    w.n0 = bi.tile * block_n;
    w.block_m = block_m;
    w.group = sh.heads / sh.kv_heads;
    w.m_begin = AttentionMask::of(p).first_query(w.n0) / block_m;
    w.m_end = (sh.seq_q + block_m - 1) / block_m;
    w.sparse = kSparse ? BlockSparse::of(p, bi.batch) : BlockSparse{};
    w.k_block = w.sparse.k_block(w.n0);
    w.tiles_per_block = w.sparse.query_tiles_per_block(block_m);
    w.begin = 0;
    w.left = INT_MAX;
    return w;
  }
  __device__ __forceinline__ Visit first() const {
    if (begin == 0) return settle({0, 0, m_begin, left});
    const int per_head = m_end - m_begin;
    return {begin / per_head, 0, m_begin + begin % per_head, left};
  }
  __device__ __forceinline__ Visit next(Visit v) const {
    if (--v.left == 0) return {group, 0, -1, 0};
    ++v.m;
    return settle(v);
  }
  __device__ __forceinline__ int head(const Visit& v) const { return kv_head * group + v.g; }
  __device__ __forceinline__ int m0(const Visit& v) const { return v.m * block_m; }

 private:
  // The first visit at or after v.
  __device__ __forceinline__ Visit settle(Visit v) const {
    for (; v.g < group; ++v.g, v.at = 0, v.m = m_begin) {
      const BlockList blocks = sparse.queries_of(kv_head * group + v.g, k_block);
      if ((v.m = blocks.tile_from(v.m, m_end, tiles_per_block, v.at)) >= 0) return v;
    }
    return {group, 0, -1, 0};
  }
};

// Whether K's kernel runs persistent blocks: for block-sparse masks only,
// whose key blocks visit few query blocks each, so that hiding a key block's
// K/V load, pipeline fill and dK/dV stores behind its neighbours' products
// pays (6% of the backward at 4k and 28% of blocks on). Dense key blocks visit
// every query block, and there the persistent kernel measured up to 6% slower
// (non-causal, 16k). Never in the deterministic mode, whose blocks wait for
// each other's dQ turns: blocks that take turns must all be resident at once,
// and a kernel running beside this one (a collective, say) could hold SMs
// that some of them need.
template <typename K, bool kDeterministic, bool kSparse>
inline constexpr bool kPersistentBwd = K::kPersistent && kSparse && !kDeterministic;

// K and V, then K::kStages stages of (Q, dO, lse * log2(e) and delta), from the
// first 1024-byte boundary of the dynamic shared memory; the barriers at
// K::kBarOffset: K/V loaded, each stage's full and empty, the kernel's
// K::kDQBarriers for handing over dQ tiles, then two for K/V free again (every
// consumer warp done with a key block's K and V) and a second K/V loaded (the
// second of each pair for KVSlots): 8 (4 + 2 kStages + kDQBarriers) bytes; then
// each stage's visit, 8 kStages bytes; then the key blocks' hand-over, 48
// bytes. bwd_smem_tail_bytes() counts all from the barriers on.
constexpr int bwd_smem_tail_bytes(int stages, int dq_barriers) {
  return 8 * (4 + 3 * stages + dq_barriers) + 48;
}

// With K::kKVSlots (persistent blocks only), a key block's K and V together
// fill one of four shared-memory slots and its steps' dS^T buffers take the
// other three in turn, so that the next key block's K/V can load into a slot
// the current one is done with while its last products still read its own.
// Slot kv holds K/V; local step j (counted from the key block's first) writes
// its dS^T to ds(j). After a key block of n steps, the next one's K/V go to
// ds(n): the slot of step n - 3, which the dQ product of step n - 3 (issued in
// step n - 2) read last, or, for n < 3, one the key block did not use.
struct KVSlots {
  int kv = 0;
  __device__ __forceinline__ int ds(int local_step) const {
    const int i = local_step % 3;
    return i + (i >= kv ? 1 : 0);
  }
  __device__ __forceinline__ void next(int steps) { kv = ds(steps); }
};

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
  // K/V load n lands at full_kv(n % 2) under KVSlots, else full_kv(0).
  __device__ __forceinline__ uint32_t full_kv(int i = 0) const {
    return i == 0 ? base + K::kBarOffset : empty_kv(2);
  }
  __device__ __forceinline__ uint32_t full(int s) const { return full_kv() + 8 * (1 + s); }
  __device__ __forceinline__ uint32_t empty(int s) const {
    return full_kv() + 8 * (1 + K::kStages + s);
  }
  __device__ __forceinline__ uint32_t dq_barrier(int i) const {
    return full_kv() + 8 * (1 + 2 * K::kStages + i);
  }
  // K/V load n is free again at empty_kv(n % 2) under KVSlots, else empty_kv(0).
  __device__ __forceinline__ uint32_t empty_kv(int i = 0) const {
    return full_kv() + 8 * (1 + 2 * K::kStages + K::kDQBarriers + i);
  }
  // The query block of a stage's step and whether it is its key block's last
  // ({m0, last}), so that consumers need not keep the walk in registers.
  __device__ __forceinline__ int2* visit(int s) const {
    return reinterpret_cast<int2*>(raw + (empty_kv(3) + 8 * s - smem_u32(raw)));
  }
  // The key blocks' hand-over (BwdKeyBlocks): two slots, each with a barrier
  // for written (by the claimer) and one for read (by every other thread
  // that walks the key blocks: the lse/delta warp, the dQ adder, the consumer
  // warpgroups).
  static constexpr int kKeyBlockReaders = 32 + 1 + (K::kThreads - 128);
  __device__ __forceinline__ uint32_t key_full(int i) const {
    return empty_kv(3) + 8 * (K::kStages + i);
  }
  __device__ __forceinline__ uint32_t key_empty(int i) const { return key_full(2 + i); }
  __device__ __forceinline__ int2* key_slot(int i) const {
    return reinterpret_cast<int2*>(raw + (key_full(4 + i) - smem_u32(raw)));
  }

  // By one thread, before a __syncthreads.
  __device__ __forceinline__ void init_barriers() const {
    for (int i = 0; i < 2; ++i) mbar_init(full_kv(i), 1);
    for (int s = 0; s < K::kStages; ++s) {
      mbar_init(full(s), 1 + 32);  // the TMA thread and the lse/delta warp
      mbar_init(empty(s), K::kStageReleases);
    }
    K::init_dq_barriers(*this);
    for (int i = 0; i < 2; ++i) mbar_init(empty_kv(i), 8);  // one arrival per consumer warp
    for (int i = 0; i < 2; ++i) {
      mbar_init(key_full(i), 1);
      mbar_init(key_empty(i), kKeyBlockReaders);
    }
    mbar_init_fence();
  }
};

// The key blocks a block of threads takes, in order. With kPersistent the
// grid is one block per SM: a block's first key block is its own index, each
// next one the next unclaimed one of K's order (longest first under a causal
// mask), claimed from a counter at run time so that blocks which drew short
// key blocks take more. The TMA thread claims the next one once it has issued
// the current one's last loads (BwdKeyBlocks::claim) and hands it to the other
// roles through two shared-memory slots; its first loads then overlap the
// current one's last products and dK/dV stores. Otherwise a block takes the
// one key block its index names (with K::kSplits, through BwdSplit: all of
// it, or a run of its steps). Every role walks them alike, the claimer with
// kClaims:
//   for (BwdKeyBlocks<K, kPersistent> blocks(args, sm); blocks.more(); blocks.next()) ...
// Persistent blocks serve block-sparse masks only (kPersistentBwd).
template <typename K, bool kPersistent, bool kClaims = false>
struct BwdKeyBlocks {
  const BwdParams& p;
  const BwdSplit& split;
  const BwdSmem<K>& sm;
  int taken;  // key blocks taken before this one
  int2 claim;  // this one's place in K's order, and whether its walk is empty

  __device__ __forceinline__ BwdKeyBlocks(const BwdArgs& args, const BwdSmem<K>& sm_)
      : p(args.p), split(args.split), sm(sm_), taken(0),
        claim(kPersistent ? take(0) : int2{0, 0}) {}
  __device__ __forceinline__ bool more() const {
    return kPersistent ? claim.x < K::order(p).count() : taken == 0;
  }
  __device__ __forceinline__ void next() {
    ++taken;
    if (kPersistent) claim = take(taken);
  }
  __device__ __forceinline__ BlockIndex block() const {
    if constexpr (kPersistent) return K::order(p).at(claim.x);
    if constexpr (K::kSplits) return K::order(p).at(split.block_of(blockIdx.x));
    return K::order(p).block();
  }
  template <bool kSparse>
  __device__ __forceinline__ BwdWalk walk() const {
    BwdWalk w = BwdWalk::of<kSparse>(p, block(), K::kBlockM, K::kBlockN);
    if (!kPersistent && K::kSplits && split.shares(blockIdx.x)) {
      w.begin = split.first_step(blockIdx.x);
      w.left = split.end_step(blockIdx.x) - w.begin;
    }
    return w;
  }
  // Whether this key block visits no query block. Persistent blocks have it
  // from the claimer, so that the consumers need not read the mask's lists
  // (dependent global loads) between one key block and the next.
  template <bool kSparse>
  __device__ __forceinline__ bool empty() const {
    if constexpr (kPersistent)
      return claim.y;
    else
      return walk<kSparse>().first().done();
  }

 private:
  // The n-th key block's place in K's order (count or more once all are
  // claimed) and whether its walk is empty. The claimer takes the next
  // unclaimed one (the grid's blocks start at their index) and writes both to
  // its slot; the others read them there.
  __device__ __forceinline__ int2 take(int n) const {
    const int slot = n & 1;
    if constexpr (kClaims) {
      const int id = n == 0 ? int(blockIdx.x) : atomicAdd(p.key_block_counter, 1) + int(gridDim.x);
      const bool empty =
          id < K::order(p).count() &&
          BwdWalk::of<true>(p, K::order(p).at(id), K::kBlockM, K::kBlockN).first().done();
      mbar_wait(sm.key_empty(slot), ((n >> 1) & 1) ^ 1);
      *sm.key_slot(slot) = int2{id, empty};
      mbar_arrive(sm.key_full(slot));
      return int2{id, empty};
    } else {
      mbar_wait(sm.key_full(slot), (n >> 1) & 1);
      const int2 claim = *sm.key_slot(slot);
      mbar_arrive(sm.key_empty(slot));
      return claim;
    }
  }
};

// The producer warpgroup: the first lane of warp 0 loads each key block's K
// and V and each step's Q and dO by TMA; warp 1 writes each step's lse, delta
// and visit. Both wait for the consumer warps to free a stage, and K/V loads wait
// for them to be done with the previous key block's.
template <typename K, bool kPersistent, bool kSparse>
__device__ __forceinline__ void bwd_produce(const BwdArgs& args, const BwdSmem<K>& sm, int warp,
                                            int lane) {
  const BwdParams& p = args.p;
  const AttentionShape& sh = p.shape;
  constexpr int kStages = K::kStages, kBlockM = K::kBlockM, kBlockN = K::kBlockN;
  int step = 0;
  if (warp == 0 && lane == 0) {
    constexpr bool kSlots = kPersistent && K::kKVSlots;
    int kv_loads = 0;
    KVSlots slots;
    // Claims the next key block once this one's last loads are issued.
    for (BwdKeyBlocks<K, kPersistent, /*kClaims=*/true> blocks(args, sm); blocks.more();
         blocks.next()) {
      const BwdWalk walk = blocks.template walk<kSparse>();
      bool first = true;
      int steps = 0;
      for (BwdWalk::Visit visit = walk.first(); !visit.done();
           visit = walk.next(visit), ++step, ++steps) {
        const int s = step % kStages, head = walk.head(visit), m0 = walk.m0(visit);
        mbar_wait(sm.empty(s), ((step / kStages) & 1) ^ 1);
        mbar_arrive_expect_tx(sm.full(s), 2 * K::kQBytes);
#pragma unroll
        for (int c = 0; c < K::kPanels; ++c) {
          tma_load_4d(sm.q(s) + c * kBlockM * 128, &args.q, sm.full(s), c * 64, head, m0,
                      walk.batch);
          tma_load_4d(sm.dout(s) + c * kBlockM * 128, &args.dout, sm.full(s), c * 64, head, m0,
                      walk.batch);
        }
        if (first) {  // K and V after the first Q and dO, which need not wait for them
          first = false;
          // KVSlots: the slot's last reader was the dQ product of step `step`
          // - 3, done once step - 2 released its stage (waited for above), or
          // a key block two loads back; the barriers alternate by load, so
          // that this load cannot complete a phase the consumers have yet to
          // wait for.
          uint32_t k_dst = sm.k(), full = sm.full_kv();
          if constexpr (kSlots) {
            mbar_wait(sm.empty_kv(kv_loads & 1), ((kv_loads >> 1) & 1) ^ 1);
            k_dst = K::slot(sm.base, slots.kv);
            full = sm.full_kv(kv_loads & 1);
          } else {
            mbar_wait(sm.empty_kv(), (kv_loads & 1) ^ 1);
          }
          ++kv_loads;
          const uint32_t v_dst = k_dst + (sm.v() - sm.k());
          mbar_arrive_expect_tx(full, 2 * K::kKVBytes);
#pragma unroll
          for (int c = 0; c < K::kPanels; ++c) {
            tma_load_4d(k_dst + c * kBlockN * 128, &args.k, full, c * 64, walk.kv_head, walk.n0,
                        walk.batch);
            tma_load_4d(v_dst + c * kBlockN * 128, &args.v, full, c * 64, walk.kv_head, walk.n0,
                        walk.batch);
          }
        }
      }
      if (kSlots && steps > 0) slots.next(steps);
    }
  } else if (warp == 1) {
    for (BwdKeyBlocks<K, kPersistent> blocks(args, sm); blocks.more(); blocks.next()) {
      const BwdWalk walk = blocks.template walk<kSparse>();
      BwdWalk::Visit after;
      for (BwdWalk::Visit visit = walk.first(); !visit.done(); visit = after, ++step) {
        const int s = step % kStages, head = walk.head(visit), m0 = walk.m0(visit);
        after = walk.next(visit);
        mbar_wait(sm.empty(s), ((step / kStages) & 1) ^ 1);
        if (lane == 0) *sm.visit(s) = make_int2(m0, after.done());
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
}

// The dQ adder, one thread of the producer warpgroup. Each consumer
// warpgroup w writes its finished dQ tile of walk step `step` to shared memory
// as K::kDQPanels panels of kBlockM queries x 32 head-dim columns (fp32,
// 128-byte swizzled rows; panel c holds columns 32 (w K::kDQPanels + c) ..),
// then each of its warps arrives at K::dq_full(sm, step, w). The adder has the
// TMA unit add the panels into the accumulator, waits until they have left
// shared memory and arrives at K::dq_free(sm, step, w). The consumers thus
// never wait for the TMA unit. Deterministic: key block n adds both tiles of a
// query block in its turn n, after block n - 1 (dq_turns.cuh).
template <typename K, bool kDeterministic, bool kSparse>
__device__ __forceinline__ void bwd_add_dq(const BwdArgs& args, const BwdSmem<K>& sm) {
  int step = 0;
  constexpr bool kPersistent = kPersistentBwd<K, kDeterministic, kSparse>;
  for (BwdKeyBlocks<K, kPersistent> blocks(args, sm); blocks.more(); blocks.next()) {
    const BwdWalk walk = blocks.template walk<kSparse>();
    [[maybe_unused]] const int key_block = blocks.block().tile;
    for (BwdWalk::Visit visit = walk.first(); !visit.done(); visit = walk.next(visit), ++step) {
      const int head = walk.head(visit), m0 = walk.m0(visit);
      auto add = [&](int w) {
#pragma unroll
        for (int c = 0; c < K::kDQPanels; ++c)
          tma_reduce_add_4d(&args.dq_accum, K::dq_panel(sm, step, w, c),
                            32 * (w * K::kDQPanels + c), head, m0, walk.batch);
      };
      if constexpr (kDeterministic) {
        const DQTurns turns(args.p, walk.batch, head, m0);
        mbar_wait(K::dq_full(sm, step, 0), K::dq_parity(step));
        mbar_wait(K::dq_full(sm, step, 1), K::dq_parity(step));
        turns.wait(key_block);
        fence_async_global();
        add(0);
        add(1);
        bulk_commit();
        bulk_wait();
        fence_async_global();
        turns.pass();
        mbar_arrive(K::dq_free(sm, step, 0));
        mbar_arrive(K::dq_free(sm, step, 1));
      } else {
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          mbar_wait(K::dq_full(sm, step, w), K::dq_parity(step));
          add(w);
          bulk_commit();
          bulk_wait_read();
          mbar_arrive(K::dq_free(sm, step, w));
        }
      }
    }
  }
  bulk_wait();
}

// The producer warpgroup's roles: warps 0 and 1 fill the stages
// (bwd_produce), one lane of warp 2 is the dQ adder, warp 3 has nothing to do.
template <typename K, bool kDeterministic, bool kSparse>
__device__ __forceinline__ void bwd_producer_warpgroup(const BwdArgs& args, const BwdSmem<K>& sm,
                                                       int warp, int lane) {
  regs_shrink<K::kProducerRegs>();
  if (warp < 2) {
    bwd_produce<K, kPersistentBwd<K, kDeterministic, kSparse>, kSparse>(args, sm, warp, lane);
  } else if (warp == 2 && lane == 0) {
    bwd_add_dq<K, kDeterministic, kSparse>(args, sm);
  }
}

// After a kernel that shared key blocks (bwd_split.h): each shared key block's
// dK (times the softmax scale) and dV from its fp32 sums, which hold
// K::kSplitSlotFloats per key block: dK's kBlockN rows of kD, then dV's. One
// thread per 8 columns of a row.
template <typename T, int kD, typename K>
__global__ void __launch_bounds__(256)
    bwd_split_finish_kernel(const BwdParams p, const BwdSplit split, int shared) {
  constexpr int kChunks = kD / 8;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(shared) * K::kSplitSlotFloats / 8) return;
  const int chunk = int(i % kChunks);
  const int64_t row_of_sums = i / kChunks;  // (key block, dK or dV, row)
  const int row = int(row_of_sums % K::kBlockN);
  const int grad = int(row_of_sums / K::kBlockN % 2);
  const int slot = int(row_of_sums / (2 * K::kBlockN));
  const BlockIndex bi = K::order(p).at(split.whole + slot);
  const AttentionShape& sh = p.shape;
  const int key = bi.tile * K::kBlockN + row;
  if (key >= sh.seq_k) return;
  T* dst = static_cast<T*>(grad == 0 ? p.dk : p.dv) +
           ((int64_t(bi.batch) * sh.seq_k + key) * sh.kv_heads + bi.head) * kD + chunk * 8;
  *reinterpret_cast<uint4*>(dst) = scaled_chunk<T>(p.dkv_partials + row_of_sums * kD + chunk * 8,
                                                   grad == 0 ? p.softmax_scale : 1.f);
}

// The backward's launches: the preprocess pass, `kernel` (K's build
// kDeterministic, kSparse), the split key blocks' sums written out when there
// are any, and the dQ conversion.
template <typename T, int kD, typename K, bool kDeterministic, bool kSparse>
cudaError_t launch_bwd_build(void (*kernel)(BwdArgs), const BwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  BwdArgs args;
  args.p = p;
  cudaError_t err;
  if ((err = dq_accum_tensor_map(&args.dq_accum, sh, p.dq_accum, K::kBlockM)) != cudaSuccess ||
      (err = query_tensor_map<T>(&args.q, sh, p.q, K::kBlockM)) != cudaSuccess ||
      (err = query_tensor_map<T>(&args.dout, sh, p.dout, K::kBlockM)) != cudaSuccess ||
      (err = key_tensor_map<T>(&args.k, sh, p.k, K::kBlockN)) != cudaSuccess ||
      (err = key_tensor_map<T>(&args.v, sh, p.v, K::kBlockN)) != cudaSuccess)
    return err;
  if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  K::kSmemBytes)) != cudaSuccess)
    return err;
  const int count = K::order(p).count();
  dim3 grid = K::order(p).grid();
  int sms = 0;
  if ((err = current_device_attribute<cudaDevAttrMultiProcessorCount>(&sms)) != cudaSuccess)
    return err;
  if constexpr (kPersistentBwd<K, kDeterministic, kSparse>) {
    grid = dim3(std::min(count, sms));
  } else if constexpr (K::kSplits) {
    // Key blocks without a causal mask or window visit every query block
    // alike (BwdWalk): the last wave's are shared.
    if (!kDeterministic && !p.causal && p.window_left < 0 && p.window_right < 0 &&
        p.dkv_partials != nullptr) {
      const int steps = sh.heads / sh.kv_heads * ((sh.seq_q + K::kBlockM - 1) / K::kBlockM);
      const int64_t slots = p.dkv_partial_floats / K::kSplitSlotFloats;
      args.split = BwdSplit::plan(count, steps, sms, int(std::min<int64_t>(slots, INT_MAX)));
    }
    grid = dim3(args.split.grid(count));
  }
  const int shared = args.split.shared_blocks(count);
  int64_t sums = 0;  // floats of the shared key blocks' sums, zeroed by the preprocess pass
  if constexpr (K::kSplits) sums = int64_t(shared) * K::kSplitSlotFloats;
  launch_bwd_preprocess<T, kD>(p, stream, p.dkv_partials, sums);
  kernel<<<grid, K::kThreads, K::kSmemBytes, stream>>>(args);
  if constexpr (K::kSplits) {
    if (shared > 0)
      bwd_split_finish_kernel<T, kD, K>
          <<<int((sums / 8 + 255) / 256), 256, 0, stream>>>(p, args.split, shared);
  }
  launch_bwd_convert_dq<T, kD>(p, stream);
  return cudaGetLastError();
}

// The build a call needs. kernel_of(det, sparse), given std::bool_constants,
// names K's kernel of that build.
template <typename T, int kD, typename K, typename KernelOf>
cudaError_t launch_bwd_passes(KernelOf kernel_of, const BwdParams& p, cudaStream_t stream) {
  using std::false_type, std::true_type;
  if (p.block_sparse.q_lists != nullptr) {
    // The dQ turns count every key block, so a deterministic block-sparse
    // backward is the sm80 family's (the FFI sends it there).
    if (p.dq_turns != nullptr) return cudaErrorNotSupported;
    return launch_bwd_build<T, kD, K, false, true>(kernel_of(false_type{}, true_type{}), p,
                                                   stream);
  }
  if (p.dq_turns != nullptr)
    return launch_bwd_build<T, kD, K, true, false>(kernel_of(true_type{}, false_type{}), p,
                                                   stream);
  return launch_bwd_build<T, kD, K, false, false>(kernel_of(false_type{}, false_type{}), p,
                                                  stream);
}

}  // namespace jax_flash::sm90
