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
  static constexpr int kRowBytes = kChunks * 16;
  static constexpr int kBytes = kRows * kRowBytes;
  static_assert(kChunks % 8 == 0, "swizzle needs rows of a multiple of 64 elements");

  // Shared-memory address, 128-byte aligned: the swizzle then only touches bits
  // 4-6 of an address, which the fast addressing below relies on.
  uint32_t base;

  __device__ __forceinline__ uint32_t addr(int row, int chunk) const {
    return base + row * kRowBytes + ((chunk ^ (row & 7)) << 4);
  }
  // Address of the 16-bit element (row, col).
  __device__ __forceinline__ uint32_t elem_addr(int row, int col) const {
    return addr(row, col >> 3) + ((col & 7) << 1);
  }
};

// Copies rows [0, valid_rows) of a global [kRows x kCols] tile (row stride in
// elements) into `tile` with cp.async; rows past valid_rows are zero-filled.
// Each pass of the threads covers a multiple of 8 rows, so a thread's swizzled
// chunk is the same in every pass: its shared addresses differ by constants and
// its global ones by one stride.
template <int kThreads, typename Tile, typename T>
__device__ __forceinline__ void load_tile_async(const Tile& tile, const T* gmem, int64_t row_stride,
                                                int valid_rows, int tid) {
  constexpr int kRowsPerPass = kThreads / Tile::kChunks;
  static_assert(kThreads % Tile::kChunks == 0 && kRowsPerPass % 8 == 0 &&
                    Tile::kRows % kRowsPerPass == 0,
                "tile copy must divide evenly into passes of whole 8-row groups");
  const int row = tid / Tile::kChunks;
  const int chunk = tid % Tile::kChunks;
  const uint32_t dst = tile.addr(row, chunk);
  const T* src = gmem + row * row_stride + chunk * 8;
  const int64_t pass_stride = kRowsPerPass * row_stride;
#pragma unroll
  for (int i = 0; i < Tile::kRows / kRowsPerPass; ++i) {
    const bool valid = row + i * kRowsPerPass < valid_rows;
    cp_async_16(dst + i * kRowsPerPass * Tile::kRowBytes, valid ? src : gmem, valid);
    src += pass_stride;
  }
}

// ldmatrix.x4 fragments of one operand of mma_16816, read from a swizzled tile.
// An operand is "outer x k" (A: m x k, B: n x k in the instruction's col
// layout); kTrans says the tile stores it k-major (smem rows are k), and
// ldmatrix.trans then yields the same fragment. The four 8x8 matrices are
//   A:  (o+0,k+0) (o+8,k+0) (o+0,k+8) (o+8,k+8)
//   B:  (n+0,k+0) (n+0,k+8) (n+8,k+0) (n+8,k+8)   (r[0..1] for n0, r[2..3] for n0+8)
// With the row a multiple of 8 plus the lane's row, and the chunk even plus the
// lane's chunk, the swizzled address is
//   (origin ^ ((chunk & 6) << 4)) + row * kRowBytes + ((chunk & ~7) << 4)
// where origin holds the lane's part: a fragment at a constant offset costs one
// LOP3 and an immediate instead of a full swizzle computation.
template <bool kA, bool kTrans, typename Tile>
struct Fragments {
  uint32_t origin;
  int outer_chunk;  // run-time outer offset, in chunks, of a k-major tile

  // o0: run-time outer offset (a multiple of 16) of the fragments to load.
  __device__ __forceinline__ Fragments(const Tile& tile, int o0, int lane) {
    const int mi = lane >> 3;
    const int outer_half = kA ? (mi & 1) : (mi >> 1);
    const int k_half = kA ? (mi >> 1) : (mi & 1);
    const int lane_row = (kTrans ? k_half : outer_half) * 8 + (lane & 7);
    const int lane_chunk = kTrans ? outer_half : k_half;
    origin = tile.base + lane_row * Tile::kRowBytes + (((lane_chunk ^ lane) & 1) << 4) +
             ((lane & 6) << 4);
    if (kTrans) {
      outer_chunk = o0 >> 3;
    } else {
      origin += o0 * Tile::kRowBytes;
      outer_chunk = 0;
    }
  }

  // The fragment at outer offset o and k offset k (multiples of 16) past (o0, 0).
  __device__ __forceinline__ void load(uint32_t (&r)[4], int o, int k) const {
    const int row = kTrans ? k : o;
    const int chunk = kTrans ? outer_chunk + (o >> 3) : (k >> 3);
    ldmatrix_x4<kTrans>(r, (origin ^ ((chunk & 6) << 4)) + row * Tile::kRowBytes +
                               ((chunk & ~7) << 4));
  }
};

}  // namespace jax_flash
