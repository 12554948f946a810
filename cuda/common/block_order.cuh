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

}  // namespace jax_flash
