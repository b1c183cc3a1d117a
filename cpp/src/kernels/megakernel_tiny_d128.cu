// The megakernel specialized for TinyD128 (model_traits.hpp).
#include "kernels/megakernel_launch.cuh"

namespace flashformer {
template CompiledConfig compiled_config<TinyD128>();
}  // namespace flashformer
