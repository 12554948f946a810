// Tile sizes of the sm90 kernels, one row per head dim: the only place to tune.
//
// Forward: one producer warpgroup feeds K/V tiles through kStages shared-memory
// buffers and Q tiles through kQBuffers (with two, the next tile's Q lands
// while this one runs; head_dim 256 has no room for a second); kConsumers
// warpgroups each own 64 of the block's kBlockM queries and walk the keys
// kBlockN at a time.
// Backward: two consumer warpgroups each own 64 of the block's 128 keys and walk
// the queries kBlockM at a time, Q/dO tiles arriving through kStages buffers.
// Head_dim 256 (flash_bwd_wide.cuh): blocks of 64 keys, the warpgroups splitting
// S/dP by keys and dK/dV/dQ by head-dim rows.
#pragma once

namespace jax_flash::sm90 {

template <int kHeadDim>
struct FwdTile;
template <> struct FwdTile<64>  {
  static constexpr int kBlockN = 128, kStages = 2, kQBuffers = 2, kConsumers = 3;
};
template <> struct FwdTile<128> {
  static constexpr int kBlockN = 128, kStages = 2, kQBuffers = 2, kConsumers = 2;
};
template <> struct FwdTile<256> {
  static constexpr int kBlockN = 64,  kStages = 2, kQBuffers = 1, kConsumers = 2;
};

// kProducerRegs / kConsumerRegs: the backward's register split (setmaxnreg),
// chosen by the spill report: at head_dim 128 the consumers spill in their
// loop unless they have 240.
template <int kHeadDim>
struct BwdTile;
template <> struct BwdTile<64>  {
  static constexpr int kBlockM = 128, kStages = 2, kProducerRegs = 40, kConsumerRegs = 232;
};
template <> struct BwdTile<128> {
  static constexpr int kBlockM = 64, kStages = 2, kProducerRegs = 24, kConsumerRegs = 240;
};
template <> struct BwdTile<256> { static constexpr int kBlockM = 64, kStages = 2; };

}  // namespace jax_flash::sm90
