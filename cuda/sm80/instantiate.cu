// One kernel configuration per compilation unit, chosen by the build:
//   JAX_FLASH_DTYPE (bf16 | f16), JAX_FLASH_HEAD_DIM (64 | 128 | 256),
//   JAX_FLASH_PASS (fwd | bwd).
// Units compile in parallel, and a subset build compiles only what it lists.
#include "../kernel_registry.h"
#include "flash_bwd.cuh"
#include "flash_fwd.cuh"

#define JAX_FLASH_CAT_(a, b) a##b
#define JAX_FLASH_CAT(a, b) JAX_FLASH_CAT_(a, b)
#define JAX_FLASH_fwd 1
#define JAX_FLASH_bwd 2
#define JAX_FLASH_bf16 1
#define JAX_FLASH_f16 2

#if JAX_FLASH_CAT(JAX_FLASH_, JAX_FLASH_DTYPE) == JAX_FLASH_bf16
using Element = __nv_bfloat16;
constexpr jax_flash::DType kDType = jax_flash::DType::kBF16;
#else
using Element = __half;
constexpr jax_flash::DType kDType = jax_flash::DType::kF16;
#endif

#if JAX_FLASH_CAT(JAX_FLASH_, JAX_FLASH_PASS) == JAX_FLASH_fwd
static const bool registered = jax_flash::register_fwd(
    kDType, JAX_FLASH_HEAD_DIM, &jax_flash::sm80::launch_fwd<Element, JAX_FLASH_HEAD_DIM>);
#else
static const bool registered = jax_flash::register_bwd(
    kDType, JAX_FLASH_HEAD_DIM, &jax_flash::sm80::launch_bwd<Element, JAX_FLASH_HEAD_DIM>);
#endif
