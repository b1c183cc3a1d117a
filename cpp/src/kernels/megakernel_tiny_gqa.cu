// The megakernel specialized for TinyGqa (model_traits.hpp).
#include "kernels/megakernel_launch.cuh"

namespace flashformer {
template CompiledConfig compiled_config<TinyGqa>();
}  // namespace flashformer
