// Attributes of the current device, read once per device: the FFI path asks on
// every launch (kernel family, persistent grid size).
#pragma once

#include <cuda_runtime.h>

namespace jax_flash {

template <cudaDeviceAttr kAttr>
inline cudaError_t current_device_attribute(int* value) {
  constexpr int kMaxDevices = 64;
  static int values[kMaxDevices] = {};  // 0: not read yet (no attribute used here is 0)
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxDevices) return cudaDeviceGetAttribute(value, kAttr, device);
  if (values[device] == 0 &&
      (err = cudaDeviceGetAttribute(&values[device], kAttr, device)) != cudaSuccess)
    return err;
  *value = values[device];
  return cudaSuccess;
}

}  // namespace jax_flash
