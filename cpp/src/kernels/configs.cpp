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

template <int Config, WeightFormat F>
KernelLaunch instrumented_launch() {
  if constexpr (FLASHFORMER_INSTRUMENTED)
    return kernel_launch<Config, Build::kInstrumented, F>();
  else
    return {};
}

template <int Config>
CompiledConfig compiled_config() {
  constexpr WeightFormat kBf16 = WeightFormat::kBf16, kFp8 = WeightFormat::kFp8;
  static_assert(int(kBf16) == 0 && int(kFp8) == 1 && kNumWeightFormats == 2, "the launches are indexed by format");
  return CompiledConfig{kCompiledConfigs[Config],
                        {kernel_launch<Config, Build::kShipped, kBf16>(), kernel_launch<Config, Build::kShipped, kFp8>()},
                        {instrumented_launch<Config, kBf16>(), instrumented_launch<Config, kFp8>()}};
}

template <size_t... I>
std::vector<CompiledConfig> all_configs(std::index_sequence<I...>) {
  return {compiled_config<int(I)>()...};
}

}  // namespace

const std::vector<CompiledConfig>& compiled_configs() {
  static const std::vector<CompiledConfig> configs = all_configs(std::make_index_sequence<kNumConfigs>{});
  return configs;
}

bool has_instrumented_kernels() { return FLASHFORMER_INSTRUMENTED != 0; }

}  // namespace flashformer
