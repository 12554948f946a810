#include "kernel_registry.h"

namespace jax_flash {
namespace {

constexpr int kNumHeadDims = sizeof(kNativeHeadDims) / sizeof(kNativeHeadDims[0]);

int head_dim_index(int head_dim) {
  for (int i = 0; i < kNumHeadDims; ++i)
    if (kNativeHeadDims[i] == head_dim) return i;
  return -1;
}

template <typename Launcher>
Launcher (&table())[2][kNumHeadDims] {
  static Launcher launchers[2][kNumHeadDims] = {};
  return launchers;
}

template <typename Launcher>
bool put(DType dtype, int head_dim, Launcher launcher) {
  const int i = head_dim_index(head_dim);
  if (i < 0) return false;
  table<Launcher>()[static_cast<int>(dtype)][i] = launcher;
  return true;
}

template <typename Launcher>
Launcher get(DType dtype, int head_dim) {
  const int i = head_dim_index(head_dim);
  return i < 0 ? nullptr : table<Launcher>()[static_cast<int>(dtype)][i];
}

}  // namespace

bool register_fwd(DType d, int h, FwdLauncher l) { return put(d, h, l); }
bool register_bwd(DType d, int h, BwdLauncher l) { return put(d, h, l); }
FwdLauncher find_fwd(DType d, int h) { return get<FwdLauncher>(d, h); }
BwdLauncher find_bwd(DType d, int h) { return get<BwdLauncher>(d, h); }

}  // namespace jax_flash
