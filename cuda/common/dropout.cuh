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
  uint32_t k0, k1, threshold;
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

  // The factors (0 or scale) of keys k and k + 1 (k even) for query q.
  __device__ __forceinline__ float2 pair(int q, int k) const {
    const Philox4x32 r(uint32_t(q), uint32_t(k) >> 2, bh, 0u, k0, k1);
    const int w = k & 2;
    return make_float2(r.x[w] >= threshold ? scale : 0.f, r.x[w + 1] >= threshold ? scale : 0.f);
  }
  __device__ __forceinline__ bool keeps(int q, int k) const {
    const Philox4x32 r(uint32_t(q), uint32_t(k) >> 2, bh, 0u, k0, k1);
    return r.x[k & 3] >= threshold;
  }

  // Multiplies an accumulator tile of probabilities (rows = queries, each
  // thread's pairs of adjacent keys) by the factors.
  template <typename Acc>
  __device__ __forceinline__ void apply(Acc& s, int q0, int k0, int lane) const {
#pragma unroll
    for (int mt = 0; mt < Acc::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < Acc::kNT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float2 f =
              pair(q0 + Acc::row(mt, 2 * h, lane), k0 + Acc::col(nt, 2 * h, lane));
          s.x[mt][nt][2 * h] *= f.x;
          s.x[mt][nt][2 * h + 1] *= f.y;
        }
  }
};

}  // namespace jax_flash
