// The one place that maps a configuration (kernel family, dtype, head dim) to a
// kernel. Each compiled kernel unit registers its launchers at load time, so a
// build of a subset of configurations still links, and asking for a missing one
// is a clear error rather than a missing symbol.
#pragma once

#include <cuda_runtime.h>

#include "params.h"

namespace jax_flash {

using FwdLauncher = cudaError_t (*)(const FwdParams&, cudaStream_t);
using BwdLauncher = cudaError_t (*)(const BwdParams&, cudaStream_t);

inline constexpr int kNativeHeadDims[] = {64, 128, 256};

// Kernel families, by the instruction set they are written for. kSm80 runs on
// every supported GPU; kSm90 (wgmma, TMA) only on compute capability 9.x.
enum class Arch { kSm80, kSm90 };
inline constexpr int kNumArchs = 2;

bool register_fwd(Arch arch, DType dtype, int head_dim, FwdLauncher launcher);
bool register_bwd(Arch arch, DType dtype, int head_dim, BwdLauncher launcher);
FwdLauncher find_fwd(Arch arch, DType dtype, int head_dim);  // nullptr if not compiled
BwdLauncher find_bwd(Arch arch, DType dtype, int head_dim);

// The families worth trying on the current device, best first: kSm90 on
// compute capability 9.x unless JAX_FLASH_KERNELS=sm80 asks for the portable
// family, then kSm80. Returns how many were written to `archs`.
int preferred_archs(Arch (&archs)[kNumArchs]);

}  // namespace jax_flash

// The configurations this library holds kernels for, one line each as
// "<family> <dtype> <head_dim> <pass>" (e.g. "sm90 bf16 128 fwd"): how a build is
// checked, from Python through ctypes, without a GPU.
extern "C" const char* JaxFlashCompiledKernels();
