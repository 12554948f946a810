// Hopper (sm_90a) primitives: mbarriers, TMA tile copies, the wgmma fences and
// shared-memory matrix descriptors, register reallocation and named barriers.
// Everything the sm90 kernels do beyond plain CUDA goes through these names.
#pragma once

#include <cuda.h>
#include <cstdint>

namespace jax_flash::sm90 {

// The most dynamic shared memory a block may opt into (227 KB).
inline constexpr int kMaxSmemBytes = 227 * 1024;

// --- mbarrier: a shared-memory barrier whose phases complete when the expected
// arrivals (and, for TMA, the expected bytes) have come in.

__device__ __forceinline__ void mbar_init(uint32_t bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
}

// Makes barrier initialization visible to the other threads and to the TMA unit.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` of TMA data to come in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Waits until the phase with the given parity has completed. A fresh barrier
// counts its (nonexistent) previous phase, parity 1, as complete.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// A word of shared memory that one role hands another: written before an
// mbarrier arrival (which releases it), read after the matching wait.
__device__ __forceinline__ void st_shared_u32(uint32_t addr, int v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

__device__ __forceinline__ int ld_shared_u32(uint32_t addr) {
  int v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}

// Four 8x8 16-bit matrices to shared memory: lane l gives the address of row
// l % 8 of matrix l / 8, and r[i] is the lane's fragment of matrix i (row
// lane / 4, columns 2 (lane % 4), +1: an mma accumulator's pair).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// --- TMA: a box of a tensor described by a CUtensorMap (a __grid_constant__
// kernel parameter) copied to shared memory; completion counts bytes on `bar`.

__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// Adds a box of shared memory into the tensor (fp32 add, done by the TMA unit
// at L2); completes as a bulk group of the issuing thread.
__device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* map, uint32_t src, int c0,
                                                  int c1, int c2, int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Waits until this thread's bulk groups have read their shared memory.
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
// Waits until this thread's bulk groups are complete.
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

// A tile of kRows positions x kPanels * 64 head-dim columns of one head, as
// kPanels 128-byte-swizzled panels of kRows * 128 bytes from dst on.
template <int kPanels, int kRows>
__device__ __forceinline__ void tma_load_tile(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                              int head, int row0, int batch) {
#pragma unroll
  for (int c = 0; c < kPanels; ++c)
    tma_load_4d(dst + c * kRows * 128, map, bar, c * 64, head, row0, batch);
}

__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// --- wgmma ordering.

// Orders this warpgroup's register and shared-memory accesses before the next
// wgmma.mma_async reads them.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// The compiler sees a wgmma write its accumulators when it is issued, not when it
// completes; pinning them here keeps their reads and writes on the right side of
// the fence and the wait.
template <int N>
__device__ __forceinline__ void pin_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// An accumulator tile (Accum in warp_gemm.cuh) as the flat register list a
// wgmma takes.
template <int kRegs, typename Acc>
__device__ __forceinline__ float (&flat(Acc& acc))[kRegs] {
  return reinterpret_cast<float(&)[kRegs]>(acc.x);
}

// Orders this thread's ordinary shared-memory writes before later reads by the
// async proxy (wgmma operands, TMA stores); a barrier must follow.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Orders the async proxy's global memory accesses (TMA stores and reductions)
// with the generic proxy's that follow.
__device__ __forceinline__ void fence_async_global() {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}

// --- Shared-memory matrix descriptors, 128-byte swizzle.
//
// Tiles are stored in panels of 64 16-bit columns: rows of 128 bytes, 16-byte
// chunks XOR-swizzled by (row % 8), each 8-row group 1024 bytes and 1024-byte
// aligned. That is what TMA writes with CU_TENSOR_MAP_SWIZZLE_128B and a box
// 64 elements wide, and what wgmma reads with swizzle mode 1.
//   K-major operand (rows are m or n, k along the row): SBO = 1024 between 8-row
//     groups; a k step of 16 moves 32 bytes within the panel.
//   N-major operand (rows are k): SBO = 1024 between 8-row groups of k, LBO =
//     the panel stride between groups of 64 columns of n.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo_bytes) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(lbo_bytes >> 4) << 16) |
         (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// --- Warp specialization.

// setmaxnreg moves registers within the block's own allocation (65536 / threads
// per thread at launch, rounded down to 8): the consumers may grow by at most
// what the producer warpgroup gives up, or their setmaxnreg.inc waits forever.
template <int kThreads, int kConsumers, int kProducerRegs, int kConsumerRegs>
constexpr bool register_split_fits() {
  constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;
  return (kLaunchRegs - kProducerRegs) * 128 >= (kConsumerRegs - kLaunchRegs) * 128 * kConsumers;
}

template <int kRegs>
__device__ __forceinline__ void regs_grow() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void regs_shrink() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Round-robin turns of the consumer warpgroups at the tensor cores, on named
// barriers kFirst..kFirst + kN - 1: warpgroup c waits at barrier kFirst + c
// before issuing its products and then arrives at the next one (two
// warpgroups, 256 threads, meet at each), so that one warpgroup's elementwise
// work runs while another's products do. The last warpgroup opens the first
// turn, and the first one takes a last empty turn at the end, so that every
// arrival is waited for.
template <int kN, int kFirst = 1>
struct TensorCoreTurns {
  int consumer;

  __device__ __forceinline__ void begin() const {
    if (kN > 1 && consumer == kN - 1) named_barrier_arrive(kFirst, 256);
  }
  __device__ __forceinline__ void wait() const {
    if (kN > 1) named_barrier_sync(kFirst + consumer, 256);
  }
  __device__ __forceinline__ void pass() const {
    if (kN > 1) named_barrier_arrive(kFirst + (consumer + 1) % kN, 256);
  }
  __device__ __forceinline__ void finish() const {
    if (kN > 1 && consumer == 0) wait();
  }
};

}  // namespace jax_flash::sm90
