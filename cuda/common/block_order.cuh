// The order in which a kernel's tiles (of one sequence axis, per head and
// batch) are handed to the GPU. Tiles of one head normally run side by side, so
// the K/V (or Q/dO) they all read stays in L2. Under a causal mask the tiles'
// costs differ by up to the sequence length, so they go longest first; but
// longest first over every head at once would have each running tile read a
// different head, all from memory. So the heads (with their batch index) go in
// chunks of kCausalChunk, each chunk's tiles longest first: the tiles that run
// at one time read the K/V of a few heads, and the short ones fill in at the
// end of each chunk. Tiles are taken in this order as SMs come free: by the
// GPU's block scheduler, or by a persistent kernel's tile counter.
#pragma once

#include <cuda_runtime.h>

namespace jax_flash {

struct BlockIndex {
  int tile;
  int head;
  int batch;
};

// (head, batch) pairs per chunk under a causal mask.
inline constexpr int kCausalChunk = 8;

struct TileOrder {
  int tiles;
  int heads;
  int batch;
  bool causal;
  // Under a causal mask the last tile has the most work (query tiles in the
  // forward); otherwise the first one does (key tiles in the backward).
  bool last_tile_longest;

  __host__ __device__ __forceinline__ int count() const { return tiles * heads * batch; }

  __host__ __device__ __forceinline__ BlockIndex at(int id) const {
    if (!causal) {
      const int rest = id / tiles;
      return {id % tiles, rest % heads, rest / heads};
    }
    const int pairs = heads * batch;
    const int first = id / (kCausalChunk * tiles) * kCausalChunk;  // the chunk's first pair
    const int size = pairs - first < kCausalChunk ? pairs - first : kCausalChunk;
    const int within = id - first * tiles;
    const int rank = within / size;  // 0: the longest tile
    const int pair = first + within % size;
    return {last_tile_longest ? tiles - 1 - rank : rank, pair % heads, pair / heads};
  }

  // One block per tile: under a causal mask the grid is one-dimensional.
  __host__ __forceinline__ dim3 grid() const {
    return causal ? dim3(count()) : dim3(tiles, heads, batch);
  }
  __device__ __forceinline__ BlockIndex block() const {
    if (causal) return at(int(blockIdx.x));
    return {int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
  }
};

}  // namespace jax_flash
