// One sm90 kernel configuration per compilation unit (see unit_config.h),
// compiled for sm_90a only.
#include "../kernel_registry.h"
#include "../unit_config.h"
#include "flash_bwd.cuh"
#include "flash_bwd_wide.cuh"
#include "flash_fwd.cuh"

#if JAX_FLASH_IS_FWD
static const bool registered =
    jax_flash::register_fwd(jax_flash::Arch::kSm90, kDType, JAX_FLASH_HEAD_DIM,
                            &jax_flash::sm90::launch_fwd<Element, JAX_FLASH_HEAD_DIM>);
#elif JAX_FLASH_HEAD_DIM <= 128
static const bool registered =
    jax_flash::register_bwd(jax_flash::Arch::kSm90, kDType, JAX_FLASH_HEAD_DIM,
                            &jax_flash::sm90::launch_bwd<Element, JAX_FLASH_HEAD_DIM>);
#else
static const bool registered =
    jax_flash::register_bwd(jax_flash::Arch::kSm90, kDType, JAX_FLASH_HEAD_DIM,
                            &jax_flash::sm90::launch_bwd_wide<Element, JAX_FLASH_HEAD_DIM>);
#endif
