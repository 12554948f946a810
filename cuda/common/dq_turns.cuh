// The deterministic backward's order of dQ additions. The key blocks that
// reach a query block are 0, 1, ..., n_last (a causal mask only cuts off the
// later ones), and each kernel block handles one key block (the sm90 backward
// runs persistent blocks only outside this mode), visiting query blocks in the
// same order as every other. With a turn counter per (batch,
// head, query block), zeroed by the preprocess pass, each of the k adders of
// key block n (k disjoint column ranges of its dQ) waits until the counter
// reaches k n, adds its part, and increments the counter: every element of dQ
// then receives its additions in key-block order, so the sums are bitwise
// repeatable. Blocks only wait for blocks of lower key index, which start
// earlier in every grid order used here, so the waits always end.
#pragma once

#include <cstdint>

#include "../params.h"

namespace jax_flash {

struct DQTurns {
  int* counter;  // this block's counter for the current query block; nullptr: no order

  __device__ __forceinline__ DQTurns(const BwdParams& p, int batch, int head, int m0) {
    const AttentionShape& sh = p.shape;
    const int blocks = (sh.seq_q + kDQTurnRows - 1) / kDQTurnRows;
    counter = p.dq_turns == nullptr
                  ? nullptr
                  : p.dq_turns + (int64_t(batch) * sh.heads + head) * blocks + m0 / kDQTurnRows;
  }

  // One thread waits until `turn` additions to the query block are complete;
  // the caller's barrier then lets the others go.
  __device__ __forceinline__ void wait(int turn) const {
    int seen;
    do {
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < turn);
  }

  // One thread, after a barrier behind every thread's additions: they become
  // visible before the next turn begins.
  __device__ __forceinline__ void pass() const {
    __threadfence();
    asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(counter) : "memory");
  }
};

}  // namespace jax_flash
