// Gemma 2's soft cap on the scores: a raw score s = q.k becomes
// cap * tanh(s * softmax_scale / cap), already scaled, so the softmax then
// takes scale 1. The backward multiplies dS by the cap's slope 1 - tanh^2
// (the softmax scale is applied where it was before: dK's epilogue, dQ's
// conversion).
#pragma once

namespace jax_flash {

struct SoftCap {
  float cap;    // 0: none
  float inner;  // softmax_scale / cap

  template <typename Params>
  __host__ __device__ static SoftCap of(const Params& p) {
    return {p.softcap, p.softcap > 0.f ? p.softmax_scale / p.softcap : 0.f};
  }
  __device__ __forceinline__ bool on() const { return cap > 0.f; }
  // The scale the softmax applies to the (capped) scores.
  __device__ __forceinline__ float softmax_scale(float scale) const { return on() ? 1.f : scale; }

  // Caps an accumulator tile of raw scores in place.
  template <typename Acc>
  __device__ __forceinline__ void apply(Acc& s) const {
#pragma unroll
    for (int mt = 0; mt < Acc::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < Acc::kNT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) s.x[mt][nt][i] = cap * tanhf(s.x[mt][nt][i] * inner);
  }
};

}  // namespace jax_flash
