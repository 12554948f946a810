// A [kRows x kCols] tile of 16-bit elements in shared memory, row-major with the
// 16-byte chunks of each row XOR-swizzled by (row % 8). Rows of 64+ elements then
// span all 32 banks, so ldmatrix (8 rows, one chunk each) and cp.async (one row,
// consecutive chunks) are both conflict-free.
#pragma once

#include "instructions.cuh"

namespace jax_flash {

template <int kRows_, int kCols_>
struct SmemTile {
  static constexpr int kRows = kRows_;
  static constexpr int kCols = kCols_;
  static constexpr int kChunks = kCols / 8;
  static constexpr int kBytes = kRows * kCols * 2;
  static_assert(kChunks % 8 == 0, "swizzle needs rows of a multiple of 64 elements");

  uint32_t base;  // shared-memory address

  __device__ __forceinline__ uint32_t addr(int row, int chunk) const {
    return base + ((row * kChunks + (chunk ^ (row & 7))) << 4);
  }
  // Address of the 16-bit element (row, col).
  __device__ __forceinline__ uint32_t elem_addr(int row, int col) const {
    return addr(row, col >> 3) + ((col & 7) << 1);
  }
};

// Copies rows [0, valid_rows) of a global [kRows x kCols] tile (row stride in
// elements) into `tile` with cp.async; rows past valid_rows are zero-filled.
template <int kThreads, typename Tile, typename T>
__device__ __forceinline__ void load_tile_async(const Tile& tile, const T* gmem, int64_t row_stride,
                                                int valid_rows, int tid) {
  constexpr int kTotal = Tile::kRows * Tile::kChunks;
  static_assert(kTotal % kThreads == 0, "tile copy must divide evenly among threads");
#pragma unroll
  for (int i = tid; i < kTotal; i += kThreads) {
    const int row = i / Tile::kChunks;
    const int chunk = i % Tile::kChunks;
    const bool valid = row < valid_rows;
    const T* src = gmem + (valid ? row : 0) * row_stride + chunk * 8;
    cp_async_16(tile.addr(row, chunk), src, valid);
  }
}

// Fragments for mma_16816. An operand tile is "outer x k" (A: m x k, B: n x k in
// the instruction's col layout). kTrans says the tile stores it k-major, i.e. the
// smem rows are k; ldmatrix.trans then yields the same fragment.
//
// A fragment of rows o0..o0+15, k0..k0+15: matrices (o+0,k+0) (o+8,k+0) (o+0,k+8) (o+8,k+8).
template <bool kTrans, typename Tile>
__device__ __forceinline__ void load_frag_a(uint32_t (&r)[4], const Tile& tile, int o0, int k0,
                                            int lane) {
  const int mi = lane >> 3;
  const int o = o0 + (mi & 1) * 8;
  const int k = k0 + (mi >> 1) * 8;
  const uint32_t a = kTrans ? tile.addr(k + (lane & 7), o >> 3) : tile.addr(o + (lane & 7), k >> 3);
  ldmatrix_x4<kTrans>(r, a);
}

// B fragments of two n8 tiles, n0..n0+15, k0..k0+15: matrices (n+0,k+0) (n+0,k+8)
// (n+8,k+0) (n+8,k+8); r[0..1] belong to n0, r[2..3] to n0+8.
template <bool kTrans, typename Tile>
__device__ __forceinline__ void load_frag_b2(uint32_t (&r)[4], const Tile& tile, int o0, int k0,
                                             int lane) {
  const int mi = lane >> 3;
  const int o = o0 + (mi >> 1) * 8;
  const int k = k0 + (mi & 1) * 8;
  const uint32_t a = kTrans ? tile.addr(k + (lane & 7), o >> 3) : tile.addr(o + (lane & 7), k >> 3);
  ldmatrix_x4<kTrans>(r, a);
}

}  // namespace jax_flash
