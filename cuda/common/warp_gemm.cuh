// Warp-level matrix products on register accumulators. An accumulator tile
// covers kMT x kNT mma tiles (16 x 8 each); element i of tile (mt, nt) sits at
//   row = mt * 16 + lane / 4 + (i / 2) * 8,   col = nt * 8 + 2 * (lane % 4) + i % 2.
#pragma once

#include "instructions.cuh"
#include "smem_tile.cuh"

namespace jax_flash {

template <int kMT_, int kNT_>
struct Accum {
  static constexpr int kMT = kMT_;
  static constexpr int kNT = kNT_;
  float x[kMT][kNT][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int n = 0; n < kNT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) x[m][n][i] = 0.f;
  }
  static __device__ __forceinline__ int row(int mt, int i, int lane) {
    return mt * 16 + (lane >> 2) + (i >> 1) * 8;
  }
  static __device__ __forceinline__ int col(int nt, int i, int lane) {
    return nt * 8 + 2 * (lane & 3) + (i & 1);
  }
};

// Writes rows Acc::row(0, 2 h, lane) of an accumulator as T:
// `dst` is this lane's row at column 0 (16-byte aligned) and `store` whether
// the lane writes it. Each quad of lanes transposes its 4 x 4 column pairs of
// every 4 mma tiles, so that a lane holds 8 adjacent columns and writes them
// with one 16-byte store: a quarter of the store instructions of one per pair,
// each filling whole 32-byte sectors. Every lane of the warp must call it.
template <typename T, typename Acc>
__device__ __forceinline__ void store_accum_rows(T* dst, const Acc& acc, int h, bool store,
                                                 int lane) {
  static_assert(Acc::kNT % 4 == 0, "16-byte stores take 4 mma tiles' columns");
#pragma unroll
  for (int g = 0; g < Acc::kNT / 4; ++g) {
    uint32_t pairs[4];  // pairs[j]: columns (4 g + j) * 8 + 2 (lane % 4), +1
#pragma unroll
    for (int j = 0; j < 4; ++j)
      pairs[j] = pack2<T>(acc.x[0][4 * g + j][2 * h], acc.x[0][4 * g + j][2 * h + 1]);
    // Swap across lane bit b and index bit b, b = 0 then 1: afterwards
    // pairs[j] holds columns g * 32 + (lane % 4) * 8 + 2 j, +1.
#pragma unroll
    for (int bit = 1; bit <= 2; bit *= 2) {
      const bool upper = lane & bit;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j & bit) continue;
        const uint32_t got = __shfl_xor_sync(0xffffffff, upper ? pairs[j] : pairs[j | bit], bit);
        if (upper)
          pairs[j] = got;
        else
          pairs[j | bit] = got;
      }
    }
    if (store)
      *reinterpret_cast<uint4*>(dst + g * 32 + (lane & 3) * 8) =
          make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  }
}

// One bit per element of an accumulator tile, all set at first: a per-element
// condition computed in a loop of its own and read back without branches.
template <typename Acc>
struct ElementBits {
  static constexpr int kElems = Acc::kMT * Acc::kNT * 4;
  uint32_t w[(kElems + 31) / 32];

  __device__ __forceinline__ ElementBits() {
#pragma unroll
    for (int j = 0; j < (kElems + 31) / 32; ++j) w[j] = ~0u;
  }
  static __device__ __forceinline__ constexpr int index(int mt, int nt, int i) {
    return (mt * Acc::kNT + nt) * 4 + i;
  }
  __device__ __forceinline__ bool get(int mt, int nt, int i) const {
    const int e = index(mt, nt, i);
    return (w[e / 32] >> (e % 32)) & 1u;
  }
  __device__ __forceinline__ void clear(int mt, int nt, int i) {
    const int e = index(mt, nt, i);
    w[e / 32] &= ~(1u << (e % 32));
  }
  // Clears the bits of the elements (mt, nt, i) for which keep(mt, nt, i) is false.
  template <typename Keep>
  __device__ __forceinline__ void keep_where(const Keep& keep) {
#pragma unroll
    for (int mt = 0; mt < Acc::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < Acc::kNT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int e = index(mt, nt, i);
          if (!keep(mt, nt, i)) w[e / 32] &= ~(1u << (e % 32));
        }
  }
};

// B fragments of a (16 * kKS) x (16 * kNP) operand in smem, consumed in steps of
// 16 n-columns (n fastest) and requested kDepth steps ahead of their use, so
// ldmatrix latency hides behind the mma instructions in between.
template <bool kBTrans, int kKS, int kNP, typename TileB>
struct BFragmentStream {
  static constexpr int kSteps = kKS * kNP;
  static constexpr int kDepth = kSteps < 2 ? kSteps : 2;
  Fragments<false, kBTrans, TileB> frags;
  uint32_t b[kDepth + 1][4];

  __device__ __forceinline__ BFragmentStream(const TileB& tile, int n0, int lane)
      : frags(tile, n0, lane) {}
  __device__ __forceinline__ void load(int step) {
    frags.load(b[step % (kDepth + 1)], (step % kNP) * 16, (step / kNP) * 16);
  }
  __device__ __forceinline__ void start() {
#pragma unroll
    for (int step = 0; step < kDepth; ++step) load(step);
  }
  // The fragment of `step`, after requesting the one kDepth steps later.
  __device__ __forceinline__ const uint32_t* next(int step) {
    if (step + kDepth < kSteps) load(step + kDepth);
    return b[step % (kDepth + 1)];
  }
};

// acc[mt][2np, 2np+1] += a x (two n8 tiles of b).
template <typename T, typename Acc>
__device__ __forceinline__ void mma_n16(Acc& acc, int mt, int np, const uint32_t (&a)[4],
                                        const uint32_t* b) {
  mma_16816<T>(acc.x[mt][2 * np], a, b[0], b[1]);
  mma_16816<T>(acc.x[mt][2 * np + 1], a, b[2], b[3]);
}

// acc[m0.., n0..] += A[m0.., k] * B[k, n0..] over kK columns of k, both from smem;
// A fragments are requested one k-step ahead.
template <typename T, bool kATrans, bool kBTrans, int kK, typename Acc, typename TileA,
          typename TileB>
__device__ __forceinline__ void gemm_ss(Acc& acc, const TileA& a_tile, int m0, const TileB& b_tile,
                                        int n0, int lane) {
  static_assert(Acc::kNT % 2 == 0, "B fragments are loaded two n-tiles at a time");
  constexpr int kKS = kK / 16, kNP = Acc::kNT / 2;
  BFragmentStream<kBTrans, kKS, kNP, TileB> b(b_tile, n0, lane);
  const Fragments<true, kATrans, TileA> a_frags(a_tile, m0, lane);
  uint32_t a[2][Acc::kMT][4];
#pragma unroll
  for (int mt = 0; mt < Acc::kMT; ++mt) a_frags.load(a[0][mt], mt * 16, 0);
  b.start();
#pragma unroll
  for (int ks = 0; ks < kKS; ++ks)
#pragma unroll
    for (int np = 0; np < kNP; ++np) {
      const uint32_t* bf = b.next(ks * kNP + np);
      if (np == kNP - 1 && ks + 1 < kKS) {
#pragma unroll
        for (int mt = 0; mt < Acc::kMT; ++mt)
          a_frags.load(a[(ks + 1) & 1][mt], mt * 16, (ks + 1) * 16);
      }
#pragma unroll
      for (int mt = 0; mt < Acc::kMT; ++mt) mma_n16<T>(acc, mt, np, a[ks & 1][mt], bf);
    }
}

// Packs an fp32 accumulator [kMT x 16*kKS] into A fragments of mma_16816: the C
// layout of two adjacent n8 tiles is the A layout of one k16 step.
template <typename T, typename Acc>
__device__ __forceinline__ void accum_to_a_frags(uint32_t (&a)[Acc::kMT][Acc::kNT / 2][4],
                                                 const Acc& acc) {
#pragma unroll
  for (int mt = 0; mt < Acc::kMT; ++mt)
#pragma unroll
    for (int ks = 0; ks < Acc::kNT / 2; ++ks) {
      a[mt][ks][0] = pack2<T>(acc.x[mt][2 * ks][0], acc.x[mt][2 * ks][1]);
      a[mt][ks][1] = pack2<T>(acc.x[mt][2 * ks][2], acc.x[mt][2 * ks][3]);
      a[mt][ks][2] = pack2<T>(acc.x[mt][2 * ks + 1][0], acc.x[mt][2 * ks + 1][1]);
      a[mt][ks][3] = pack2<T>(acc.x[mt][2 * ks + 1][2], acc.x[mt][2 * ks + 1][3]);
    }
}

// acc += A * B with A already in registers (kMT x kKS k16 steps) and B from smem.
template <typename T, bool kBTrans, int kMT, int kKS, typename Acc, typename TileB>
__device__ __forceinline__ void gemm_rs(Acc& acc, const uint32_t (&a)[kMT][kKS][4],
                                        const TileB& b_tile, int n0, int lane) {
  static_assert(Acc::kMT == kMT && Acc::kNT % 2 == 0, "fragment shapes must agree");
  constexpr int kNP = Acc::kNT / 2;
  BFragmentStream<kBTrans, kKS, kNP, TileB> b(b_tile, n0, lane);
  b.start();
#pragma unroll
  for (int ks = 0; ks < kKS; ++ks)
#pragma unroll
    for (int np = 0; np < kNP; ++np) {
      const uint32_t* bf = b.next(ks * kNP + np);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) mma_n16<T>(acc, mt, np, a[mt][ks], bf);
    }
}

// Stores an accumulator as 16-bit values into smem at (row0.., col0..).
template <typename T, typename Acc, typename Tile>
__device__ __forceinline__ void store_accum_smem(const Acc& acc, const Tile& tile, int row0,
                                                 int col0, int lane) {
#pragma unroll
  for (int mt = 0; mt < Acc::kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < Acc::kNT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t v = pack2<T>(acc.x[mt][nt][2 * h], acc.x[mt][nt][2 * h + 1]);
        const uint32_t a = tile.elem_addr(row0 + Acc::row(mt, 2 * h, lane),
                                          col0 + Acc::col(nt, 0, lane));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a), "r"(v));
      }
}

}  // namespace jax_flash
