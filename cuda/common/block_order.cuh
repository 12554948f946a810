// The order in which a kernel's blocks (tiles of one sequence axis, per head and
// batch) are handed to the GPU. Blocks of one head normally run side by side, so
// the K/V (or Q/dO) they all read stays in L2. Under a causal mask the blocks'
// costs differ by up to the sequence length; the tile axis then becomes the
// slowest grid axis, ordered from the longest tile down, so every head's longest
// tiles start first and the short ones fill in at the end.
#pragma once

#include <cuda_runtime.h>

namespace jax_flash {

struct BlockIndex {
  int tile;
  int head;
  int batch;
};

__host__ __forceinline__ dim3 block_grid(int tiles, int heads, int batch, bool causal) {
  return causal ? dim3(heads, batch, tiles) : dim3(tiles, heads, batch);
}

// last_tile_longest: under a causal mask the last tile has the most work (query
// tiles in the forward); otherwise the first one does (key tiles in the backward).
__device__ __forceinline__ BlockIndex block_index(bool causal, bool last_tile_longest) {
  if (!causal) return {int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
  const int tile = last_tile_longest ? int(gridDim.z - 1 - blockIdx.z) : int(blockIdx.z);
  return {tile, int(blockIdx.x), int(blockIdx.y)};
}

// The same order for persistent kernels, which take tiles id = blockIdx.x,
// blockIdx.x + gridDim.x, ...: under a causal mask the longest tiles of every
// head come first; otherwise the tiles of one head are consecutive.
struct TileOrder {
  int tiles;
  int heads;
  int batch;
  bool causal;

  __host__ __device__ __forceinline__ int count() const { return tiles * heads * batch; }
  __device__ __forceinline__ BlockIndex at(int id) const {
    if (causal) {
      const int rest = id % (heads * batch);
      return {tiles - 1 - id / (heads * batch), rest % heads, rest / heads};
    }
    const int rest = id / tiles;
    return {id % tiles, rest % heads, rest / heads};
  }
};

}  // namespace jax_flash
