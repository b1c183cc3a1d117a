#include "devices.hpp"

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

}  // namespace flashformer
