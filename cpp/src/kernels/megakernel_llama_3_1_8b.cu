// The megakernel specialized for Llama31_8B (model_traits.hpp).
#include "kernels/megakernel_launch.cuh"

namespace flashformer {
template CompiledConfig compiled_config<Llama31_8B>();
}  // namespace flashformer
