// One sm80 kernel configuration per compilation unit (see unit_config.h).
#include "../kernel_registry.h"
#include "../unit_config.h"
#include "flash_bwd.cuh"
#include "flash_fwd.cuh"

#if JAX_FLASH_IS_FWD
static const bool registered =
    jax_flash::register_fwd(jax_flash::Arch::kSm80, kDType, JAX_FLASH_HEAD_DIM,
                            &jax_flash::sm80::launch_fwd<Element, JAX_FLASH_HEAD_DIM>);
#else
static const bool registered =
    jax_flash::register_bwd(jax_flash::Arch::kSm80, kDType, JAX_FLASH_HEAD_DIM,
                            &jax_flash::sm80::launch_bwd<Element, JAX_FLASH_HEAD_DIM>);
#endif
