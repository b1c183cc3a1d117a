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

// Reads `bytes` (a multiple of 16) at `src` once with 16-byte loads from every SM (a read-only
// streaming probe: time it to measure the HBM read bandwidth). Writes one word to `sink` so the
// loads cannot be removed.
void read_probe(const void* src, int64_t bytes, void* sink, cudaStream_t stream);

// Packs a row-major bf16 (rows, cols) matrix into fragment order (weight_layout.cuh), rows
// permuted by `row_order` (a RowOrder; `order_param`: head_dim or intermediate size).
// Throws std::invalid_argument when rows or cols is not a multiple of 16.
void pack_weight(const void* src, void* dst, int64_t rows, int64_t cols, int row_order, int64_t order_param,
                 cudaStream_t stream);

}  // namespace flashformer
