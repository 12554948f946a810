// The one place that maps a configuration (dtype, head dim) to a kernel. Each
// compiled kernel unit registers its launchers at load time, so a build of a
// subset of configurations still links, and asking for a missing one is a clear
// error rather than a missing symbol.
#pragma once

#include <cuda_runtime.h>

#include "params.h"

namespace jax_flash {

using FwdLauncher = cudaError_t (*)(const FwdParams&, cudaStream_t);
using BwdLauncher = cudaError_t (*)(const BwdParams&, cudaStream_t);

inline constexpr int kNativeHeadDims[] = {64, 128, 256};

bool register_fwd(DType dtype, int head_dim, FwdLauncher launcher);
bool register_bwd(DType dtype, int head_dim, BwdLauncher launcher);
FwdLauncher find_fwd(DType dtype, int head_dim);  // nullptr if not compiled
BwdLauncher find_bwd(DType dtype, int head_dim);

}  // namespace jax_flash
