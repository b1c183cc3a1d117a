// Host-side launchers of the kernels in cpp/src/kernels. Plain C++ (no CUDA headers needed
// beyond the runtime), so bindings and tests can call them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flashformer {

// Copies a row-major bf16 (rows, cols) matrix src -> dst, each CTA moving one 64x64 tile through
// shared memory with TMA + mbarrier (the weight ring's unit), then ordinary stores. Throws
// std::invalid_argument for a matrix TMA cannot read, std::runtime_error on a CUDA error.
void tma_tile_copy(const void* src, void* dst, int64_t rows, int64_t cols, cudaStream_t stream);

}  // namespace flashformer
