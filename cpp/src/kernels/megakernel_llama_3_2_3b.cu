// The megakernel specialized for Llama32_3B (model_traits.hpp).
#include "kernels/megakernel_launch.cuh"

namespace flashformer {
template CompiledConfig compiled_config<Llama32_3B>();
}  // namespace flashformer
