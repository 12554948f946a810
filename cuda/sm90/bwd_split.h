// Key blocks shared in the backward's last wave. With one block of threads per
// key block, all of equal length (no causal mask), and one block per SM,
// `count` key blocks on `sms` SMs take ceil(count / sms) waves, the last one
// with only count % sms of the SMs busy: at 2048 key blocks on 132 SMs, 16
// waves for 15.5 waves' work. Instead the first count / sms waves' blocks of
// threads take a key block each as before, and each remaining key block's steps
// (query blocks) are cut into BwdSplit::runs runs, one per block of threads
// after those, which finish in fewer rounds of shorter runs. A run adds its
// partial dK/dV to its key block's fp32 sums by atomics (zeroed by the
// preprocess pass), and a pass after the kernel writes the sums out
// (bwd_split_finish_kernel). Nothing waits for anything: blocks of threads may
// run in any order.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace jax_flash::sm90 {

struct BwdSplit {
  int whole = INT_MAX;  // blocks of threads [0, whole) take key block blockIdx.x
  int runs = 1;         // runs per later key block
  int steps = 0;        // steps per key block

  // The key block of block of threads b (its place in the kernel's order).
  __host__ __device__ __forceinline__ int block_of(int b) const {
    return b < whole ? b : whole + (b - whole) / runs;
  }
  __host__ __device__ __forceinline__ bool shares(int b) const { return b >= whole; }
  // The steps [first_step, end_step) of a sharing block of threads' run.
  __host__ __device__ __forceinline__ int first_step(int b) const {
    return (b - whole) % runs * steps / runs;
  }
  __host__ __device__ __forceinline__ int end_step(int b) const {
    return ((b - whole) % runs + 1) * steps / runs;
  }
  // Blocks of threads, and key blocks whose sums are in use, for `count` key blocks.
  int grid(int count) const { return count <= whole ? count : whole + (count - whole) * runs; }
  int shared_blocks(int count) const { return count <= whole ? 0 : count - whole; }

  // The plan for `count` key blocks of `steps` steps each on `sms` SMs with
  // room for `slots` key blocks' sums: the number of runs (up to kMaxRuns)
  // that finishes the last key blocks soonest, estimated in steps with
  // kRunCost more per run (its K/V load, pipeline fill and dK/dV atomics);
  // none where that saves less than kPassCost, about what zeroing the sums
  // and the pass that writes them out take (~8 us on an H200, 3-4 steps).
  static constexpr int kMaxRuns = 8, kRunCost = 3, kPassCost = 3;
  static BwdSplit plan(int count, int steps, int sms, int slots) {
    BwdSplit none;
    if (count <= 0 || steps <= 1 || sms <= 0) return none;
    const int rest = count % sms;
    if (rest == 0 || rest > slots) return none;
    int64_t best = steps + kRunCost;
    int best_runs = 1;
    for (int k = 2; k <= kMaxRuns && k <= steps; ++k) {
      const int64_t rounds = (int64_t(rest) * k + sms - 1) / sms;
      const int64_t time = rounds * ((steps + k - 1) / k + kRunCost);
      if (time < best) best = time, best_runs = k;
    }
    if (best + kPassCost >= steps + kRunCost) return none;
    return {count - rest, best_runs, steps};
  }
};

}  // namespace jax_flash::sm90
