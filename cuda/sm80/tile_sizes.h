// Tile sizes of the sm80 kernels, one row per head dim: the only place to tune.
//
// Forward: a block owns kBlockM queries split evenly over its warps and walks the
// keys kBlockN at a time. Backward: a block owns kBlockN keys and walks the
// queries of every head in its GQA group kBlockM at a time; each of its matrix
// products has its own warp grid (rows x cols of warps).
#pragma once

namespace jax_flash::sm80 {

template <int kRows, int kCols>
struct WarpGrid {
  static constexpr int kWarpRows = kRows;
  static constexpr int kWarpCols = kCols;
};

template <int kHeadDim>
struct FwdTile;
template <> struct FwdTile<64>  { static constexpr int kBlockM = 128, kBlockN = 128, kWarps = 4; };
template <> struct FwdTile<128> { static constexpr int kBlockM = 128, kBlockN = 64,  kWarps = 4; };
template <> struct FwdTile<256> { static constexpr int kBlockM = 128, kBlockN = 64,  kWarps = 8; };

// kStages: buffers for the (Q, dO) tiles; 2 overlaps the next load with compute.
template <int kHeadDim>
struct BwdTile;
// Each warp's share of a product is at least 32 x 32 so that every fragment
// loaded from shared memory feeds several mma instructions: with 16-row slices
// the loads, not the tensor cores, would set the pace.
template <> struct BwdTile<64> {
  static constexpr int kBlockN = 128, kBlockM = 128, kWarps = 8, kStages = 2;
  using ScoreWarps = WarpGrid<4, 2>;  // S^T, dP^T: [kBlockN x kBlockM]
  using KVWarps = WarpGrid<4, 2>;     // dK, dV:    [kBlockN x head_dim]
  using QWarps = WarpGrid<4, 2>;      // dQ:        [kBlockM x head_dim]
};
template <> struct BwdTile<128> {
  static constexpr int kBlockN = 128, kBlockM = 64, kWarps = 8, kStages = 2;
  using ScoreWarps = WarpGrid<4, 2>;
  using KVWarps = WarpGrid<4, 2>;
  using QWarps = WarpGrid<2, 4>;
};
template <> struct BwdTile<256> {
  static constexpr int kBlockN = 64, kBlockM = 64, kWarps = 8, kStages = 1;
  using ScoreWarps = WarpGrid<2, 4>;
  using KVWarps = WarpGrid<2, 4>;
  using QWarps = WarpGrid<2, 4>;
};

}  // namespace jax_flash::sm80
