// Host side of the sm90 launchers: TMA tensor maps for [batch, seq, heads,
// head_dim] arrays, read in boxes of `rows` sequence positions x 128 bytes of
// head_dim (64 16-bit or 32 fp32 columns) of one head with the 128-byte swizzle
// (see sw128_desc in hopper.cuh; positions past the sequence end read as zeros
// and are clipped from reductions).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "../device_info.h"
#include "../params.h"

namespace jax_flash::sm90 {

// The driver's encoder, found through the runtime so that nothing links libcuda.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A [batch, seq, heads, head_dim] array read (or reduced into) in boxes of
// `rows` positions x 128 bytes of head_dim of one head, 128-byte swizzled.
inline cudaError_t encode_tensor_map(CUtensorMap* map, CUtensorMapDataType type, int elem_bytes,
                                     const void* data, int batch, int seq, int heads,
                                     int head_dim, int rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const uint64_t elem = elem_bytes;
  const cuuint64_t dims[4] = {cuuint64_t(head_dim), cuuint64_t(heads), cuuint64_t(seq),
                              cuuint64_t(batch)};
  const cuuint64_t strides[3] = {head_dim * elem, uint64_t(heads) * head_dim * elem,
                                 uint64_t(seq) * heads * head_dim * elem};
  const cuuint32_t box[4] = {cuuint32_t(128 / elem_bytes), 1, cuuint32_t(rows), 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, type, 4, const_cast<void*>(data), dims, strides, box,
                            element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T>
constexpr CUtensorMapDataType tensor_map_type() {
  return std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                          : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// The [batch, seq_q, heads, head_dim] operands (q, dout) and the
// [batch, seq_k, kv_heads, head_dim] ones (k, v) of element type T, in boxes of
// `rows` positions.
template <typename T>
cudaError_t query_tensor_map(CUtensorMap* map, const AttentionShape& sh, const void* data,
                             int rows) {
  return encode_tensor_map(map, tensor_map_type<T>(), 2, data, sh.batch, sh.seq_q, sh.heads,
                           sh.head_dim, rows);
}
template <typename T>
cudaError_t key_tensor_map(CUtensorMap* map, const AttentionShape& sh, const void* data,
                           int rows) {
  return encode_tensor_map(map, tensor_map_type<T>(), 2, data, sh.batch, sh.seq_k, sh.kv_heads,
                           sh.head_dim, rows);
}
// The fp32 [batch, seq_q, heads, head_dim] dQ accumulator, in boxes of `rows`
// positions x 32 columns.
inline cudaError_t dq_accum_tensor_map(CUtensorMap* map, const AttentionShape& sh, float* data,
                                       int rows) {
  return encode_tensor_map(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, data, sh.batch, sh.seq_q,
                           sh.heads, sh.head_dim, rows);
}

}  // namespace jax_flash::sm90
