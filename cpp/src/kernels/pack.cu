// Load-time packing of weight matrices into the megakernel's fragment order.
#include <stdexcept>
#include <string>

#include "cuda_check.hpp"
#include "flashformer/weight_layout.cuh"
#include "kernels/launch.hpp"

namespace flashformer {
namespace {

// One thread per lane vector: the 8 bf16 of one lane of one 16x16 fragment.
__global__ void pack_weight_kernel(const uint16_t* __restrict__ src, uint4* __restrict__ dst, int64_t rows,
                                   int64_t cols, RowOrder order, int64_t param) {
  const int64_t vec = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec >= rows * cols / 8) return;
  const int64_t lane = vec % kWarpSize, frag = vec / kWarpSize;
  const int64_t kb = frag % (cols / kKBlock), rb = frag / (cols / kKBlock);
  const int64_t g = lane / 4, t = lane % 4;
  uint16_t e[8];
  for (int i = 0; i < 8; ++i) {
    const int64_t row = rb * kRowBlock + (i / 2 % 2) * 8 + g;
    const int64_t col = kb * kKBlock + (i / 4) * 8 + t * 2 + i % 2;
    e[i] = src[source_row(order, row, param) * cols + col];
  }
  uint4 out;
  out.x = e[0] | uint32_t(e[1]) << 16;
  out.y = e[2] | uint32_t(e[3]) << 16;
  out.z = e[4] | uint32_t(e[5]) << 16;
  out.w = e[6] | uint32_t(e[7]) << 16;
  dst[vec] = out;
}

}  // namespace

void pack_weight(const void* src, void* dst, int64_t rows, int64_t cols, int row_order, int64_t order_param,
                 cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || rows % kRowBlock || cols % kKBlock)
    throw std::invalid_argument("pack_weight: shape (" + std::to_string(rows) + ", " + std::to_string(cols) +
                                ") is not a positive multiple of 16 in both dimensions");
  if (row_order < 0 || row_order > int(RowOrder::kGateUp)) throw std::invalid_argument("pack_weight: unknown row order");
  const RowOrder order = RowOrder(row_order);
  if (order == RowOrder::kRopePairs && (order_param <= 0 || order_param % 32 || rows % order_param))
    throw std::invalid_argument("pack_weight: RoPE row order needs head_dim a multiple of 32 dividing rows");
  if (order == RowOrder::kGateUp && (order_param <= 0 || order_param % 8 || rows != 2 * order_param))
    throw std::invalid_argument("pack_weight: gate/up row order needs rows == 2 * intermediate");
  const int64_t vecs = rows * cols / 8;
  constexpr int kBlock = 256;
  pack_weight_kernel<<<unsigned((vecs + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
      static_cast<const uint16_t*>(src), static_cast<uint4*>(dst), rows, cols, order, order_param);
  FF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashformer
