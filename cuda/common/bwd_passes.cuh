// The two short passes around every backward kernel: before it, delta =
// rowsum(dO * O) - dlse (the lse cotangent enters here, since d lse / d s = p),
// a zeroed fp32 dQ accumulator, zeroed dQ turn counters, key-block counter,
// ALiBi slope gradients and whatever fp32 sums the kernel asks for; after it,
// dq = scale * dq_accum in the input dtype.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "../params.h"
#include "instructions.cuh"

namespace jax_flash {

constexpr float kLog2e = 1.4426950408889634f;

// One thread per 16-byte chunk of a row; a row's chunks share a warp.
template <typename T, int kD>
__global__ void __launch_bounds__(256)
    flash_bwd_preprocess_kernel(const BwdParams p, float* zeros, int64_t zero_floats) {
  constexpr int kChunks = kD / 8;
  constexpr int kRowsPerBlock = 256 / kChunks;
  const AttentionShape& sh = p.shape;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kChunks;
  const int chunk = threadIdx.x % kChunks;
  const int head = blockIdx.y, batch = blockIdx.z;
  const bool valid = row < sh.seq_q;
  const int64_t offset = ((int64_t(batch) * sh.seq_q + row) * sh.heads + head) * kD + chunk * 8;
  float dot = 0.f;
  if (valid) {
    const uint4 o = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + offset);
    const uint4 d = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + offset);
    const uint32_t* o2 = reinterpret_cast<const uint32_t*>(&o);
    const uint32_t* d2 = reinterpret_cast<const uint32_t*>(&d);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = unpack2<T>(o2[i]), b = unpack2<T>(d2[i]);
      dot = fmaf(a.x, b.x, fmaf(a.y, b.y, dot));
    }
    float4* acc = reinterpret_cast<float4*>(p.dq_accum + offset);
    acc[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    acc[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int s = kChunks / 2; s > 0; s /= 2) dot += __shfl_xor_sync(0xffffffff, dot, s);
  if (valid && chunk == 0) {
    const int64_t r = (int64_t(batch) * sh.heads + head) * sh.seq_q + row;
    p.delta[r] = dot - p.dlse[r];
    // The backward kernel's counters, zeroed here rather than by memsets of
    // their own: each launch in the stream costs more than these stores.
    const int64_t bh = int64_t(batch) * sh.heads + head;
    if (p.dq_turns != nullptr && row % kDQTurnRows == 0)
      p.dq_turns[bh * ((sh.seq_q + kDQTurnRows - 1) / kDQTurnRows) + row / kDQTurnRows] = 0;
    if (p.dalibi_slopes != nullptr && row == 0) p.dalibi_slopes[bh] = 0.f;
    if (p.key_block_counter != nullptr && row == 0 && bh == 0) *p.key_block_counter = 0;
  }
  // A kernel's own fp32 sums (zero_floats, a multiple of 4), a float4 per thread in turn.
  const int64_t threads = int64_t(gridDim.x) * gridDim.y * gridDim.z * blockDim.x;
  const int64_t me =
      ((int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x +
      threadIdx.x;
  for (int64_t i = me; i < zero_floats / 4; i += threads)
    reinterpret_cast<float4*>(zeros)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// 8 fp32 sums at src (16-byte aligned), times `scale`, as 8 T in 16 bytes.
template <typename T>
__device__ __forceinline__ uint4 scaled_chunk(const float* src, float scale) {
  const float4 a = reinterpret_cast<const float4*>(src)[0];
  const float4 b = reinterpret_cast<const float4*>(src)[1];
  return make_uint4(pack2<T>(a.x * scale, a.y * scale), pack2<T>(a.z * scale, a.w * scale),
                    pack2<T>(b.x * scale, b.y * scale), pack2<T>(b.z * scale, b.w * scale));
}

template <typename T, int kD>
__global__ void __launch_bounds__(256) flash_bwd_convert_dq_kernel(const BwdParams p) {
  const int64_t n_chunks = int64_t(p.shape.batch) * p.shape.seq_q * p.shape.heads * kD / 8;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_chunks;
       i += int64_t(gridDim.x) * blockDim.x) {
    reinterpret_cast<uint4*>(p.dq)[i] = scaled_chunk<T>(p.dq_accum + 8 * i, p.softmax_scale);
  }
}

template <typename T, int kD>
void launch_bwd_preprocess(const BwdParams& p, cudaStream_t stream, float* zeros = nullptr,
                           int64_t zero_floats = 0) {
  constexpr int kRows = 256 / (kD / 8);
  const AttentionShape& sh = p.shape;
  flash_bwd_preprocess_kernel<T, kD>
      <<<dim3((sh.seq_q + kRows - 1) / kRows, sh.heads, sh.batch), 256, 0, stream>>>(
          p, zeros, zero_floats);
}

template <typename T, int kD>
void launch_bwd_convert_dq(const BwdParams& p, cudaStream_t stream) {
  const AttentionShape& sh = p.shape;
  const int64_t chunks = int64_t(sh.batch) * sh.seq_q * sh.heads * kD / 8;
  const int blocks = int(std::min<int64_t>((chunks + 255) / 256, 65536));
  flash_bwd_convert_dq_kernel<T, kD><<<blocks, 256, 0, stream>>>(p);
}

}  // namespace jax_flash
