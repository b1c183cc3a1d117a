// The megakernel specialized for Llama32_1B (model_traits.hpp).
#include "kernels/megakernel_launch.cuh"

namespace flashformer {
template CompiledConfig compiled_config<Llama32_1B>();
}  // namespace flashformer
