// Host-side launchers of the kernels in cpp/src/kernels. Plain C++ (no CUDA headers needed
// beyond the runtime), so bindings and tests can call them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "flashformer/sampling.cuh"

namespace flashformer {

// Reads `bytes` (a multiple of 16) at `src` once with 16-byte loads from every SM (a read-only
// streaming probe: time it to measure the HBM read bandwidth). Writes one word to `sink` so the
// loads cannot be removed.
void read_probe(const void* src, int64_t bytes, void* sink, cudaStream_t stream);

// Packs a row-major bf16 (rows, cols) matrix into fragment order (weight_layout.cuh), rows
// permuted by `row_order` (a RowOrder; `order_param`: head_dim or intermediate size).
// Throws std::invalid_argument when rows or cols is not a multiple of 16.
void pack_weight(const void* src, void* dst, int64_t rows, int64_t cols, int row_order, int64_t order_param,
                 cudaStream_t stream);

// The inverse: a fragment-ordered matrix back to row-major (rows at their source rows under
// `row_order`). The same checks.
void unpack_weight(const void* src, void* dst, int64_t rows, int64_t cols, int row_order, int64_t order_param,
                   cudaStream_t stream);

// The same for an e4m3 matrix (fp8_weight_fragment_index; cols a multiple of 32) and its fp32 row
// scales: pack_weight_fp8 packs the bytes and puts scale[source row] at each packed row;
// unpack_weight_fp8 writes the dequantized matrix, bf16(data * scale) (the product in fp32,
// rounded once), row-major in bf16.
void pack_weight_fp8(const void* src, const float* scale, void* dst, float* dst_scale, int64_t rows, int64_t cols,
                     int row_order, int64_t order_param, cudaStream_t stream);
void unpack_weight_fp8(const void* src, const float* scale, void* dst, int64_t rows, int64_t cols, int row_order,
                       int64_t order_param, cudaStream_t stream);

// Prefill's fused elementwise ops (prefill.cu), bf16 on the device, with the reference decoder's
// roundings: y [rows, n] = weight * bf16(x * rsqrt(mean(x^2) + eps)) (RMSNorm); out [rows, inter]
// = bf16(silu(gate)) * up from gate_up [rows, gate | up] (the MLP's activation). Throw
// std::invalid_argument on sizes they cannot take.
void rms_norm_rows(const void* x, const void* weight, void* y, int64_t rows, int64_t n, float eps, cudaStream_t stream);
void silu_mul_rows(const void* gate_up, void* out, int64_t rows, int64_t intermediate, cudaStream_t stream);

// Samples every row's next token from `args.logits` (or takes `args.next_tokens`, the fused
// arg-max, when logits is null), then feeds it to the next decode step (sampling.cuh). Throws
// std::invalid_argument for bad sizes or a vocabulary beyond the sampler's shared memory.
// `stream` belongs to CUDA device `device`.
void sample_tokens(const Sampler::Args& args, int device, cudaStream_t stream);

// The largest vocabulary the sampler holds on this device (its rows' slices in shared memory).
int sampler_max_vocab();

}  // namespace flashformer
