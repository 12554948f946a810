// The configuration of one kernel compilation unit, chosen by the build:
//   JAX_FLASH_DTYPE (bf16 | f16), JAX_FLASH_HEAD_DIM (64 | 128 | 256),
//   JAX_FLASH_PASS (fwd | bwd).
// Units compile in parallel, and a subset build compiles only what it lists.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "params.h"

#define JAX_FLASH_CAT_(a, b) a##b
#define JAX_FLASH_CAT(a, b) JAX_FLASH_CAT_(a, b)
#define JAX_FLASH_fwd 1
#define JAX_FLASH_bwd 2
#define JAX_FLASH_bf16 1
#define JAX_FLASH_f16 2
#define JAX_FLASH_IS_FWD (JAX_FLASH_CAT(JAX_FLASH_, JAX_FLASH_PASS) == JAX_FLASH_fwd)

#if JAX_FLASH_CAT(JAX_FLASH_, JAX_FLASH_DTYPE) == JAX_FLASH_bf16
using Element = __nv_bfloat16;
constexpr jax_flash::DType kDType = jax_flash::DType::kBF16;
#else
using Element = __half;
constexpr jax_flash::DType kDType = jax_flash::DType::kF16;
#endif
