// Read-only streaming probe: the measured HBM read bandwidth is the floor's denominator.
#include <stdexcept>

#include "cuda_check.hpp"
#include "kernels/launch.hpp"

namespace flashformer {
namespace {

constexpr int kProbeThreads = 512;
constexpr int kProbeUnroll = 4;  // independent 16-byte loads in flight per thread

__global__ void __launch_bounds__(kProbeThreads) read_probe_kernel(const uint4* __restrict__ src, int64_t n,
                                                                   unsigned* sink) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  unsigned acc = 0;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + (kProbeUnroll - 1) * stride < n; i += kProbeUnroll * stride) {
    uint4 v[kProbeUnroll];
#pragma unroll
    for (int u = 0; u < kProbeUnroll; ++u) v[u] = __ldcs(src + i + u * stride);  // streaming: evict first
#pragma unroll
    for (int u = 0; u < kProbeUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = __ldcs(src + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9E3779B9u) *sink = acc;  // practically never taken; keeps the loads alive
}

}  // namespace

void read_probe(const void* src, int64_t bytes, void* sink, cudaStream_t stream) {
  if (bytes <= 0 || bytes % 16 || reinterpret_cast<std::uintptr_t>(src) % 16)
    throw std::invalid_argument("read_probe: needs a 16-byte aligned buffer of a positive multiple of 16 bytes");
  int device = 0, sms = 0;
  FF_CUDA_CHECK(cudaGetDevice(&device));
  FF_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  read_probe_kernel<<<sms * 4, kProbeThreads, 0, stream>>>(static_cast<const uint4*>(src), bytes / 16,
                                                          static_cast<unsigned*>(sink));
  FF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashformer
