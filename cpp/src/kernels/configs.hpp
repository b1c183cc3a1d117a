// The compiled megakernel configs, as the engine sees them: shape, shared-memory plan, launcher.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "flashformer/megakernel_params.hpp"
#include "flashformer/model_traits.hpp"

namespace flashformer {

struct CompiledConfig {
  ModelDims dims;
  void (*prepare)();  // per device, before the first launch: opt in to the shared memory
  void (*launch)(const MegakernelParams&, int num_sms, cudaStream_t);
};

// Defined in kernels/megakernel_launch.cuh, instantiated once per config in its own .cu file.
template <class T>
CompiledConfig compiled_config();

// Every compiled config, in CompiledConfigTypes order.
const std::vector<CompiledConfig>& compiled_configs();

}  // namespace flashformer
