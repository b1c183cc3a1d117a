#include "engine.hpp"

#include <stdexcept>

#include "cuda_check.hpp"

namespace flashformer {

std::vector<DeviceInfo> list_devices() {
  std::vector<DeviceInfo> out;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky-free error and report none
    return out;
  }
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, d) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    DeviceInfo info;
    info.ordinal = d;
    info.name = p.name;
    info.major = p.major;
    info.minor = p.minor;
    info.sm_count = p.multiProcessorCount;
    info.smem_per_block_optin = p.sharedMemPerBlockOptin;
    info.l2_bytes = p.l2CacheSize;
    info.global_mem_bytes = p.totalGlobalMem;
    out.push_back(info);
  }
  return out;
}

bool cuda_available() {
  for (const DeviceInfo& d : list_devices())
    if (d.supported()) return true;
  return false;
}

Engine::Engine(int device) {
  const std::vector<DeviceInfo> devices = list_devices();
  if (devices.empty())
    throw std::runtime_error("flashformer: no CUDA device is visible (no driver, or CUDA_VISIBLE_DEVICES hides them)");
  if (device < 0 || device >= int(devices.size()))
    throw std::runtime_error("flashformer: CUDA device " + std::to_string(device) + " does not exist (" +
                             std::to_string(devices.size()) + " visible)");
  device_ = devices[device];
  if (!device_.supported())
    throw std::runtime_error("flashformer: device " + std::to_string(device) + " (" + device_.name +
                             ") has compute capability " + std::to_string(device_.major) + "." +
                             std::to_string(device_.minor) + "; the compiled kernels need 9.0 (Hopper, " +
                             kCompiledArch + ")");
}

}  // namespace flashformer
