// Dropout on the attention probabilities from a counter-based generator, so the
// backward regenerates the forward's mask and nothing is stored. The entry of
// query i and key j in (batch, head) is kept when word j % 4 of
// Philox-4x32-10(counter = (i, j / 4, batch * heads + head, 0), key = seed) is
// at least the threshold. jax_flash/dropout.py computes the same mask.
#pragma once

#include <cstdint>

#include "../params.h"

namespace jax_flash {

struct Philox4x32 {
  uint32_t x[4];

  __device__ __forceinline__ Philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                        uint32_t k0, uint32_t k1) {
    x[0] = c0, x[1] = c1, x[2] = c2, x[3] = c3;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
      if (r) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
      const uint32_t hi0 = __umulhi(0xD2511F53u, x[0]), lo0 = 0xD2511F53u * x[0];
      const uint32_t hi1 = __umulhi(0xCD9E8D57u, x[2]), lo1 = 0xCD9E8D57u * x[2];
      const uint32_t y0 = hi1 ^ x[1] ^ k0, y2 = hi0 ^ x[3] ^ k1;
      x[0] = y0, x[1] = lo1, x[2] = y2, x[3] = lo0;
    }
  }
};

struct Dropout {
  uint32_t key0, key1, threshold;  // the Philox key and the drop threshold
  uint32_t bh;  // batch * heads + head
  float scale;  // 1 / (1 - rate); 0: no dropout

  template <typename Params>
  __device__ static Dropout of(const Params& p, int batch, int head) {
    const DropoutParams& d = p.dropout;
    if (d.seed == nullptr) return {0, 0, 0, 0, 0.f};
    return {__ldg(d.seed), __ldg(d.seed + 1), d.threshold,
            uint32_t(batch) * uint32_t(p.shape.heads) + uint32_t(head), d.scale};
  }

  __device__ __forceinline__ bool on() const { return scale != 0.f; }

  // One Philox call yields the words of 4 consecutive keys for one query. A
  // warp's share of an accumulator tile (16 rows x 8 columns per mma tile) needs
  // 32 such calls: each lane makes one and the lanes exchange words by shuffles,
  // where each thread drawing its own entries would repeat every call 2 or 4
  // times.

  // Multiplies an accumulator tile of probabilities (rows = queries from q0,
  // columns = keys from k0, a multiple of 4) by 0 or scale.
  template <typename Acc>
  __device__ __forceinline__ void apply(Acc& s, int q0, int k0, int lane) const {
#pragma unroll
    for (int mt = 0; mt < Acc::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < Acc::kNT; ++nt) {
        // Lane L draws for row L % 16 of the mma tile and key group L / 16 of its 8 columns.
        const Philox4x32 r(uint32_t(q0 + mt * 16 + (lane & 15)),
                           uint32_t(k0 + nt * 8) / 4 + uint32_t(lane >> 4), bh, 0u, key0, key1);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // This thread's row (lane / 4 + 8 h) and keys 2 (lane % 4) + {0, 1}: key
          // group (lane % 4) / 2, words 2 (lane % 2) + {0, 1}.
          const int src = (lane >> 2) + 8 * h + 16 * ((lane & 3) >> 1);
          uint32_t w[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) w[j] = __shfl_sync(0xffffffffu, r.x[j], src);
          const bool odd = lane & 1;
          s.x[mt][nt][2 * h] *= (odd ? w[2] : w[0]) >= threshold ? scale : 0.f;
          s.x[mt][nt][2 * h + 1] *= (odd ? w[3] : w[1]) >= threshold ? scale : 0.f;
        }
      }
  }

  // Clears the bits of the entries dropout drops, in a transposed accumulator
  // tile (rows = keys from k0, a multiple of 4; columns = queries from q0).
  template <typename Acc, typename Bits>
  __device__ __forceinline__ void keep_transposed(Bits& bits, int q0, int k0, int lane) const {
    const int word = (lane >> 2) & 3;  // this thread's keys are lane / 4 (+ 8): word (lane / 4) % 4
#pragma unroll
    for (int mt = 0; mt < Acc::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < Acc::kNT; ++nt) {
        // Lane L draws for column L % 8 (a query) and key group L / 8 of the 16 rows.
        const Philox4x32 r(uint32_t(q0 + nt * 8 + (lane & 7)),
                           uint32_t(k0 + mt * 16) / 4 + uint32_t(lane >> 3), bh, 0u, key0, key1);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          // Row lane / 4 + 8 (i / 2): key group lane / 16 + 2 (i / 2); column
          // 2 (lane % 4) + i % 2.
          const int src = 2 * (lane & 3) + (i & 1) + 8 * ((lane >> 4) + 2 * (i >> 1));
          uint32_t w[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) w[j] = __shfl_sync(0xffffffffu, r.x[j], src);
          const uint32_t x = word == 0 ? w[0] : word == 1 ? w[1] : word == 2 ? w[2] : w[3];
          if (x < threshold) bits.clear(mt, nt, i);
        }
      }
  }
};

}  // namespace jax_flash
