#include "kernels/configs.hpp"

namespace flashformer {
namespace {

template <class... Ts>
std::vector<CompiledConfig> all_configs(std::tuple<Ts...>*) {
  return {compiled_config<Ts>()...};
}

}  // namespace

const std::vector<CompiledConfig>& compiled_configs() {
  static const std::vector<CompiledConfig> configs = all_configs(static_cast<CompiledConfigTypes*>(nullptr));
  return configs;
}

}  // namespace flashformer
