// Packing of weight matrices into the megakernel's fragment order (at load), and back (a layer at
// a time, for prefill's matmuls).
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

// Fragment (k) blocks of one row block per CTA of the unpack kernel: a 16 x 512 tile (16 KB). Its
// rows are padded by 16 bytes, so the lanes of a fragment (8 rows x 4 column pairs) store to 32
// different banks.
constexpr int kUnpackSpan = 32;
constexpr int kUnpackPad = 8;
constexpr int kUnpackThreads = 256;

// The inverse of pack_weight_kernel: one CTA per (row block, span of k blocks) reads its packed
// fragments as coalesced 16-byte vectors, transposes them through shared memory, and writes whole
// 16-byte runs of its rows (at their source rows under `order`).
__global__ void __launch_bounds__(kUnpackThreads) unpack_weight_kernel(const uint4* __restrict__ src,
                                                                       uint16_t* __restrict__ dst, int64_t cols,
                                                                       RowOrder order, int64_t param) {
  __shared__ __align__(16) uint16_t tile[kRowBlock][kUnpackSpan * kKBlock + kUnpackPad];  // (16 rows, span * 16 cols)
  const int64_t kblocks = cols / kKBlock, rb = blockIdx.y, kb0 = int64_t(blockIdx.x) * kUnpackSpan;
  const int span = int(kblocks - kb0 < kUnpackSpan ? kblocks - kb0 : kUnpackSpan);
  const uint4* frags = src + (rb * kblocks + kb0) * kWarpSize;  // (span fragments, 32 lanes)
  for (int i = threadIdx.x; i < span * kWarpSize; i += kUnpackThreads) {
    const uint4 v = frags[i];
    const int f = i / kWarpSize, g = i % kWarpSize / 4, t = i % 4;
    const uint32_t pairs[4] = {v.x, v.y, v.z, v.w};  // (col half, row half) = (0,0), (0,1), (1,0), (1,1)
#pragma unroll
    for (int q = 0; q < 4; ++q)
      *reinterpret_cast<uint32_t*>(&tile[(q % 2) * 8 + g][f * kKBlock + (q / 2) * 8 + 2 * t]) = pairs[q];
  }
  __syncthreads();  // the tile is complete before any row of it is written out
  const int vecs_per_row = span * kKBlock / 8;
  for (int i = threadIdx.x; i < kRowBlock * vecs_per_row; i += kUnpackThreads) {
    const int r = i / vecs_per_row, v = i % vecs_per_row;
    const int64_t row = source_row(order, rb * kRowBlock + r, param);
    *reinterpret_cast<uint4*>(dst + row * cols + kb0 * kKBlock + v * 8) = *reinterpret_cast<const uint4*>(&tile[r][v * 8]);
  }
}

void check_shape(const char* what, int64_t rows, int64_t cols, int row_order, int64_t order_param) {
  const std::string problem = pack_shape_problem(rows, cols, row_order, order_param);
  if (!problem.empty()) throw std::invalid_argument(std::string(what) + ": " + problem);
}

}  // namespace

void unpack_weight(const void* src, void* dst, int64_t rows, int64_t cols, int row_order, int64_t order_param,
                   cudaStream_t stream) {
  check_shape("unpack_weight", rows, cols, row_order, order_param);
  if (rows / kRowBlock > 65535) throw std::invalid_argument("unpack_weight: more than 65535 row blocks");
  const dim3 grid(unsigned((cols / kKBlock + kUnpackSpan - 1) / kUnpackSpan), unsigned(rows / kRowBlock));
  unpack_weight_kernel<<<grid, kUnpackThreads, 0, stream>>>(static_cast<const uint4*>(src), static_cast<uint16_t*>(dst),
                                                           cols, RowOrder(row_order), order_param);
  FF_CUDA_CHECK(cudaGetLastError());
}

void pack_weight(const void* src, void* dst, int64_t rows, int64_t cols, int row_order, int64_t order_param,
                 cudaStream_t stream) {
  check_shape("pack_weight", rows, cols, row_order, order_param);
  const RowOrder order = RowOrder(row_order);
  const int64_t vecs = rows * cols / 8;
  constexpr int kBlock = 256;
  pack_weight_kernel<<<unsigned((vecs + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
      static_cast<const uint16_t*>(src), static_cast<uint4*>(dst), rows, cols, order, order_param);
  FF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashformer
