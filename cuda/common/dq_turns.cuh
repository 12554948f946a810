// The deterministic backward's order of dQ additions. The key blocks that
// reach a query block are 0, 1, ..., n_last (a causal mask only cuts off the
// later ones), and each kernel block handles one key block, visiting query
// blocks in the same order as every other. With a turn counter per (batch,
// head, query block), zeroed by the preprocess pass, key block n waits until
// the counter reads n, adds its dQ, and sets it to n + 1: every element of dQ
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

  // One thread waits for key block n's turn; the caller's barrier then lets the
  // others go.
  __device__ __forceinline__ void wait(int n) const {
    int seen;
    do {
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen != n);
  }

  // One thread, after a barrier behind every thread's additions: they become
  // visible before the next key block's turn begins.
  __device__ __forceinline__ void pass(int n) const {
    __threadfence();
    asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(counter), "r"(n + 1) : "memory");
  }
};

}  // namespace jax_flash
