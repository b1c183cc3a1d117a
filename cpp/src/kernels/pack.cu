// Packing of weight matrices into the megakernel's fragment order (at load), and back (a layer at
// a time, for prefill's matmuls).
#include <cuda_fp8.h>

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

// One thread per lane vector: the 16 bytes of one lane of one 16x32 e4m3 fragment; the threads of
// a row block's first fragment also place its row scales.
__global__ void pack_fp8_kernel(const uint8_t* __restrict__ src, const float* __restrict__ scale, uint4* __restrict__ dst,
                                float* __restrict__ dst_scale, int64_t rows, int64_t cols, RowOrder order, int64_t param) {
  const int64_t vec = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec >= rows * cols / 16) return;
  const int64_t lane = vec % kWarpSize, frag = vec / kWarpSize, frags = cols / (2 * kKBlock);
  const int64_t kf = frag % frags, rb = frag / frags, g = lane / 4, t = lane % 4;
  uint32_t words[4] = {0, 0, 0, 0};
  for (int i = 0; i < 16; ++i) {
    const FragmentElement e = fp8_fragment_element(int(g), int(t), i);
    const int64_t row = rb * kRowBlock + e.row, col = kf * 2 * kKBlock + e.col;
    words[i / 4] |= uint32_t(src[source_row(order, row, param) * cols + col]) << (8 * (i % 4));
  }
  dst[vec] = make_uint4(words[0], words[1], words[2], words[3]);
  if (kf == 0 && t == 0)
    for (int h = 0; h < 2; ++h) {
      const int64_t row = rb * kRowBlock + h * 8 + g;
      dst_scale[row] = scale[source_row(order, row, param)];
    }
}

// e4m3 fragments (16 x 32) of one row block per CTA of the dequantizing unpack: a 16 x 512 tile,
// as unpack_weight_kernel's.
constexpr int kUnpackFp8Span = kUnpackSpan / 2;

// unpack_weight_kernel for e4m3: one CTA per (row block, span of fragments) reads its packed
// fragments as coalesced 16-byte vectors, dequantizes each element to bf16(value * its row's
// scale) into shared memory, and writes whole 16-byte runs of its rows (prefill reads them).
__global__ void __launch_bounds__(kUnpackThreads) unpack_fp8_kernel(const uint4* __restrict__ src,
                                                                    const float* __restrict__ scale,
                                                                    uint16_t* __restrict__ dst, int64_t cols,
                                                                    RowOrder order, int64_t param) {
  __shared__ __align__(16) uint16_t tile[kRowBlock][kUnpackFp8Span * 2 * kKBlock + kUnpackPad];
  const int64_t frags = cols / (2 * kKBlock), rb = blockIdx.y, f0 = int64_t(blockIdx.x) * kUnpackFp8Span;
  const int span = int(frags - f0 < kUnpackFp8Span ? frags - f0 : kUnpackFp8Span);
  const uint4* packed = src + (rb * frags + f0) * kWarpSize;  // (span fragments, 32 lanes)
  for (int i = threadIdx.x; i < span * kWarpSize; i += kUnpackThreads) {
    const uint4 v = packed[i];
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    const int f = i / kWarpSize, g = i % kWarpSize / 4, t = i % 4;
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      const FragmentElement at = fp8_fragment_element(g, t, e);  // (in the row block)
      const int row = at.row, col = f * 2 * kKBlock + at.col;     // (col in the span)
      const __nv_fp8_storage_t b = __nv_fp8_storage_t((words[e / 4] >> (8 * (e % 4))) & 0xFF);
      const float x = __half2float(__half(__nv_cvt_fp8_to_halfraw(b, __NV_E4M3)));
      const __nv_bfloat16 y = __float2bfloat16_rn(x * scale[rb * kRowBlock + row]);
      tile[row][col] = *reinterpret_cast<const uint16_t*>(&y);
    }
  }
  __syncthreads();  // the tile is complete before any row of it is written out
  const int vecs_per_row = span * 2 * kKBlock / 8;
  for (int i = threadIdx.x; i < kRowBlock * vecs_per_row; i += kUnpackThreads) {
    const int r = i / vecs_per_row, v = i % vecs_per_row;
    const int64_t row = source_row(order, rb * kRowBlock + r, param);
    *reinterpret_cast<uint4*>(dst + row * cols + f0 * 2 * kKBlock + v * 8) = *reinterpret_cast<const uint4*>(&tile[r][v * 8]);
  }
}

void check_shape(const char* what, int64_t rows, int64_t cols, int row_order, int64_t order_param,
                 WeightFormat format = WeightFormat::kBf16) {
  const std::string problem = pack_shape_problem(rows, cols, row_order, order_param, format);
  if (!problem.empty()) throw std::invalid_argument(std::string(what) + ": " + problem);
}

constexpr int kPackBlock = 256;
unsigned pack_grid(int64_t threads) { return unsigned((threads + kPackBlock - 1) / kPackBlock); }

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

void pack_weight_fp8(const void* src, const float* scale, void* dst, float* dst_scale, int64_t rows, int64_t cols,
                     int row_order, int64_t order_param, cudaStream_t stream) {
  check_shape("pack_weight_fp8", rows, cols, row_order, order_param, WeightFormat::kFp8);
  pack_fp8_kernel<<<pack_grid(rows * cols / 16), kPackBlock, 0, stream>>>(
      static_cast<const uint8_t*>(src), scale, static_cast<uint4*>(dst), dst_scale, rows, cols, RowOrder(row_order),
      order_param);
  FF_CUDA_CHECK(cudaGetLastError());
}

void unpack_weight_fp8(const void* src, const float* scale, void* dst, int64_t rows, int64_t cols, int row_order,
                       int64_t order_param, cudaStream_t stream) {
  check_shape("unpack_weight_fp8", rows, cols, row_order, order_param, WeightFormat::kFp8);
  if (rows / kRowBlock > 65535) throw std::invalid_argument("unpack_weight_fp8: more than 65535 row blocks");
  const int64_t frags = cols / (2 * kKBlock);
  const dim3 grid(unsigned((frags + kUnpackFp8Span - 1) / kUnpackFp8Span), unsigned(rows / kRowBlock));
  unpack_fp8_kernel<<<grid, kUnpackThreads, 0, stream>>>(static_cast<const uint4*>(src), scale,
                                                         static_cast<uint16_t*>(dst), cols, RowOrder(row_order),
                                                         order_param);
  FF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashformer
