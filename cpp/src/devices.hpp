// The CUDA devices the runtime sees, and which of them the compiled kernels run on.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace flashformer {

inline constexpr int kRequiredMajor = 9;  // Hopper (sm_90a): TMA, wgmma, setmaxnreg
inline constexpr int kRequiredMinor = 0;
inline constexpr const char* kCompiledArch = "sm_90a";

struct DeviceInfo {
  int ordinal = -1;
  std::string name;
  int major = 0, minor = 0;
  int sm_count = 0;
  std::size_t smem_per_block_optin = 0;  // bytes a CTA may use after opting in
  std::size_t l2_bytes = 0;
  std::size_t global_mem_bytes = 0;
  bool supported() const { return major == kRequiredMajor && minor == kRequiredMinor; }
};

// Every CUDA device the runtime sees (empty without a driver or device; never throws).
std::vector<DeviceInfo> list_devices();

// True when some device is one the compiled kernels run on.
bool cuda_available();

}  // namespace flashformer
