#include "kernel_registry.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "device_info.h"

namespace jax_flash {
namespace {

constexpr int kNumHeadDims = sizeof(kNativeHeadDims) / sizeof(kNativeHeadDims[0]);

int head_dim_index(int head_dim) {
  for (int i = 0; i < kNumHeadDims; ++i)
    if (kNativeHeadDims[i] == head_dim) return i;
  return -1;
}

template <typename Launcher>
Launcher (&table())[kNumArchs][2][kNumHeadDims] {
  static Launcher launchers[kNumArchs][2][kNumHeadDims] = {};
  return launchers;
}

template <typename Launcher>
bool put(Arch arch, DType dtype, int head_dim, Launcher launcher) {
  const int i = head_dim_index(head_dim);
  if (i < 0) return false;
  table<Launcher>()[static_cast<int>(arch)][static_cast<int>(dtype)][i] = launcher;
  return true;
}

template <typename Launcher>
Launcher get(Arch arch, DType dtype, int head_dim) {
  const int i = head_dim_index(head_dim);
  return i < 0 ? nullptr : table<Launcher>()[static_cast<int>(arch)][static_cast<int>(dtype)][i];
}

bool sm80_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("JAX_FLASH_KERNELS");
    return v != nullptr && std::strcmp(v, "sm80") == 0;
  }();
  return forced;
}

}  // namespace

bool register_fwd(Arch a, DType d, int h, FwdLauncher l) { return put(a, d, h, l); }
bool register_bwd(Arch a, DType d, int h, BwdLauncher l) { return put(a, d, h, l); }
FwdLauncher find_fwd(Arch a, DType d, int h) { return get<FwdLauncher>(a, d, h); }
BwdLauncher find_bwd(Arch a, DType d, int h) { return get<BwdLauncher>(a, d, h); }

int preferred_archs(Arch (&archs)[kNumArchs]) {
  int n = 0;
  int major = 0;
  if (!sm80_forced() &&
      current_device_attribute<cudaDevAttrComputeCapabilityMajor>(&major) == cudaSuccess &&
      major == 9)
    archs[n++] = Arch::kSm90;
  archs[n++] = Arch::kSm80;
  return n;
}

}  // namespace jax_flash

extern "C" const char* JaxFlashCompiledKernels() {
  using namespace jax_flash;
  static const std::string listing = [] {
    std::string s;
    for (Arch arch : {Arch::kSm80, Arch::kSm90})
      for (DType dtype : {DType::kBF16, DType::kF16})
        for (int head_dim : kNativeHeadDims) {
          const std::string config = std::string(arch == Arch::kSm80 ? "sm80" : "sm90") + " " +
                                     (dtype == DType::kBF16 ? "bf16" : "f16") + " " +
                                     std::to_string(head_dim);
          if (find_fwd(arch, dtype, head_dim) != nullptr) s += config + " fwd\n";
          if (find_bwd(arch, dtype, head_dim) != nullptr) s += config + " bwd\n";
        }
    return s;
  }();
  return listing.c_str();
}
