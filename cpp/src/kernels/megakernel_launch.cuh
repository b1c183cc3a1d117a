// Host launcher of the megakernel for one config, build, weight format and KV format; CMake
// generates a translation unit per (config, build, format, KV format) that instantiates
// kernel_launch<Config, B, F, K>, so each compiles on its own.
#pragma once

#include <stdexcept>

#include "cuda_check.hpp"
#include "flashformer/megakernel.cuh"
#include "kernels/configs.hpp"

namespace flashformer {

template <class T>
void prepare_megakernel() {
  static_assert(sizeof(SmemPlan<T>) > 0, "instantiates the shared-memory checks");
  cudaFuncAttributes attr{};
  FF_CUDA_CHECK(cudaFuncGetAttributes(&attr, megakernel<T>));
  if (attr.sharedSizeBytes > size_t(kStaticSmemReserve))
    throw std::runtime_error("megakernel: static shared memory exceeds the reserve in kernel_config.hpp");
  FF_CUDA_CHECK(cudaFuncSetAttribute(megakernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     kSmemLimit - kStaticSmemReserve));
}

template <class T>
void launch_megakernel(const MegakernelParams& params, int num_sms, cudaStream_t stream) {
  void* args[] = {const_cast<MegakernelParams*>(&params)};
  // Cooperative: the runtime refuses a grid that cannot be resident at once, so the counters'
  // spin-waits can never wait on a CTA that is not running.
  const int smem = smem_split(T::kDims, params.batch).total_bytes;
  FF_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(megakernel<T>), dim3(num_sms),
                                            dim3(kThreads), args, smem, stream));
}

template <int Config, Build B, WeightFormat F, KvFormat K>
KernelLaunch kernel_launch() {
  using T = KernelTraits<Config, B, F, K>;
  return {&prepare_megakernel<T>, &launch_megakernel<T>};
}

}  // namespace flashformer
