// The compiled megakernel configs, as the engine sees them: shape and launchers of both builds.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "flashformer/kernel_config.hpp"
#include "flashformer/megakernel_params.hpp"
#include "flashformer/model_traits.hpp"

namespace flashformer {

struct KernelLaunch {
  void (*prepare)() = nullptr;  // per device, before the first launch: opt in to the shared memory
  void (*launch)(const MegakernelParams&, int num_sms, cudaStream_t) = nullptr;
  explicit operator bool() const { return launch != nullptr; }
};

struct CompiledConfig {
  ModelDims dims;
  // [WeightFormat of the layers][KvFormat]; instrumented: empty unless the build has the
  // instrumented kernels (FLASHFORMER_INSTRUMENTED)
  KernelLaunch shipped[kNumWeightFormats][kNumKvFormats];
  KernelLaunch instrumented[kNumWeightFormats][kNumKvFormats];
};

// Defined in kernels/megakernel_launch.cuh; CMake generates one translation unit per config,
// build, weight format and KV format that instantiates it (from kCompiledConfigs, model_traits.hpp).
template <int Config, Build B, WeightFormat F, KvFormat K>
KernelLaunch kernel_launch();

// Every kernel config: the compiled configs in kCompiledConfigs order, then the shards of
// kShardedConfigs (model_traits.hpp's kernel_dims); a shard has bf16 launches only.
const std::vector<CompiledConfig>& compiled_configs();

// A kernel config's name: its model's, and "-tp<world>" for a shard ("llama-3.1-8b-tp2"; CMake
// names the shards' translation units the same way).
inline std::string config_label(const ModelDims& d) {
  return d.world == 1 ? std::string(d.name) : std::string(d.name) + "-tp" + std::to_string(d.world);
}

// Whether this build holds the instrumented kernels (timing variants, step trace, test hooks).
bool has_instrumented_kernels();

}  // namespace flashformer
