// Host launcher of the megakernel for one config; each cpp/src/kernels/megakernel_<config>.cu
// instantiates it once, so every config compiles in its own translation unit.
#pragma once

#include "cuda_check.hpp"
#include "flashformer/megakernel.cuh"
#include "kernels/configs.hpp"

namespace flashformer {

template <class T>
void prepare_megakernel() {
  FF_CUDA_CHECK(cudaFuncSetAttribute(megakernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     SmemPlan<T>::kTotalBytes));
}

template <class T>
void launch_megakernel(const MegakernelParams& params, int num_sms, cudaStream_t stream) {
  void* args[] = {const_cast<MegakernelParams*>(&params)};
  // Cooperative: the runtime refuses a grid that cannot be resident at once, so the counters'
  // spin-waits can never wait on a CTA that is not running.
  FF_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(megakernel<T>), dim3(num_sms),
                                            dim3(kThreads), args, SmemPlan<T>::kTotalBytes, stream));
}

template <class T>
CompiledConfig compiled_config() {
  return {dims_of<T>(), SmemPlan<T>::kTotalBytes, SmemPlan<T>::kStages, &prepare_megakernel<T>,
          &launch_megakernel<T>};
}

}  // namespace flashformer
