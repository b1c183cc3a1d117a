#include "kernels/configs.hpp"

#include <utility>

#if !defined(FLASHFORMER_CONFIG_COUNT) || !defined(FLASHFORMER_SHARD_COUNT)
#error "CMakeLists.txt defines FLASHFORMER_CONFIG_COUNT and FLASHFORMER_SHARD_COUNT: the configs and shards it generated kernels for"
#endif
#ifndef FLASHFORMER_INSTRUMENTED
#define FLASHFORMER_INSTRUMENTED 0
#endif

namespace flashformer {
namespace {

static_assert(FLASHFORMER_CONFIG_COUNT == kNumConfigs,
              "CMakeLists.txt found another number of config lines in model_traits.hpp than kCompiledConfigs "
              "holds: keep one config per line, each starting with {\"name\", \"family\",");
static_assert(FLASHFORMER_SHARD_COUNT == kNumShardedConfigs,
              "CMakeLists.txt found another number of shard lines in model_traits.hpp than kShardedConfigs "
              "holds: keep one shard per line, each starting with {\"name\", world},");

// Whether CMake generated kernel config Config's kernel in formats F and K: every format of a
// compiled config, bf16 alone of a shard (CMakeLists.txt).
template <int Config, WeightFormat F, KvFormat K>
constexpr bool generated() {
  return Config < kNumConfigs || (F == WeightFormat::kBf16 && K == KvFormat::kBf16);
}

template <int Config, Build B, WeightFormat F, KvFormat K>
KernelLaunch launch_of() {
  if constexpr ((B == Build::kShipped || FLASHFORMER_INSTRUMENTED) && generated<Config, F, K>())
    return kernel_launch<Config, B, F, K>();
  else
    return {};
}

// Every (weight format, KV format) launch of one config and build, indexed by the formats.
template <int Config, Build B>
void fill_launches(KernelLaunch (&out)[kNumWeightFormats][kNumKvFormats]) {
  constexpr WeightFormat kBf16 = WeightFormat::kBf16, kFp8 = WeightFormat::kFp8;
  constexpr KvFormat kKvBf16 = KvFormat::kBf16, kKvFp8 = KvFormat::kFp8;
  static_assert(int(kBf16) == 0 && int(kFp8) == 1 && kNumWeightFormats == 2 && int(kKvBf16) == 0 && int(kKvFp8) == 1 &&
                    kNumKvFormats == 2,
                "the launches are indexed by format");
  out[0][0] = launch_of<Config, B, kBf16, kKvBf16>();
  out[0][1] = launch_of<Config, B, kBf16, kKvFp8>();
  out[1][0] = launch_of<Config, B, kFp8, kKvBf16>();
  out[1][1] = launch_of<Config, B, kFp8, kKvFp8>();
}

template <int Config>
CompiledConfig compiled_config() {
  CompiledConfig c{kernel_dims(Config), {}, {}};
  fill_launches<Config, Build::kShipped>(c.shipped);
  fill_launches<Config, Build::kInstrumented>(c.instrumented);
  return c;
}

template <size_t... I>
std::vector<CompiledConfig> all_configs(std::index_sequence<I...>) {
  return {compiled_config<int(I)>()...};
}

}  // namespace

const std::vector<CompiledConfig>& compiled_configs() {
  static const std::vector<CompiledConfig> configs = all_configs(std::make_index_sequence<kNumKernelConfigs>{});
  return configs;
}

bool has_instrumented_kernels() { return FLASHFORMER_INSTRUMENTED != 0; }

}  // namespace flashformer
