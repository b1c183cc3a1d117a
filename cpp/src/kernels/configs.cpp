#include "kernels/configs.hpp"

#include <utility>

#ifndef FLASHFORMER_CONFIG_COUNT
#error "CMakeLists.txt defines FLASHFORMER_CONFIG_COUNT: the configs it generated kernels for"
#endif
#ifndef FLASHFORMER_INSTRUMENTED
#define FLASHFORMER_INSTRUMENTED 0
#endif

namespace flashformer {
namespace {

static_assert(FLASHFORMER_CONFIG_COUNT == kNumConfigs,
              "CMakeLists.txt found another number of config lines in model_traits.hpp than kCompiledConfigs "
              "holds: keep one config per line, each starting with {\"name\",");

template <int Config>
KernelLaunch instrumented_launch() {
  if constexpr (FLASHFORMER_INSTRUMENTED)
    return kernel_launch<Config, Build::kInstrumented>();
  else
    return {};
}

template <size_t... I>
std::vector<CompiledConfig> all_configs(std::index_sequence<I...>) {
  return {CompiledConfig{kCompiledConfigs[I], kernel_launch<int(I), Build::kShipped>(), instrumented_launch<int(I)>()}...};
}

}  // namespace

const std::vector<CompiledConfig>& compiled_configs() {
  static const std::vector<CompiledConfig> configs = all_configs(std::make_index_sequence<kNumConfigs>{});
  return configs;
}

bool has_instrumented_kernels() { return FLASHFORMER_INSTRUMENTED != 0; }

}  // namespace flashformer
