// The fragment order of weights and activations: a 16x16 bf16 weight fragment is 512 bytes
// in which lane l (g = l/4, t = l%4) finds its four mma.m16n8k16 A registers as one 16-byte
// vector, and an activation k-block is 256 bytes in which lane l finds its two B registers
// (batch column g) as one 8-byte vector. One conflict-free shared-memory or coalesced global
// load per fragment; no ldmatrix, no swizzle. Weights are packed once at load time.
#pragma once

#include <cute/arch/mma_sm80.hpp>

#include "flashformer/kernel_config.hpp"

namespace flashformer {

// Element index of W[row][col] (K columns) in fragment order:
// [row/16][col/16][lane = g*4 + t][e], e = (col%16)/8 * 4 + (row%16)/8 * 2 + col%2,
// with g = row%8 and t = (col%8)/2: registers a0..a3 of the PTX mma fragment, in order.
__host__ __device__ constexpr int64_t weight_fragment_index(int64_t row, int64_t col, int64_t K) {
  const int64_t r = row % kRowBlock, c = col % kKBlock;
  const int64_t lane = (r % 8) * 4 + (c % 8) / 2;
  const int64_t e = (c / 8) * 4 + (r / 8) * 2 + c % 2;
  return (((row / kRowBlock) * (K / kKBlock) + col / kKBlock) * kWarpSize + lane) * 8 + e;
}

// Element index of activation a[n][k] (batch row n of `rows`, K columns) in fragment order:
// [k/16][n][t][e], t = (k%8)/2, e = (k%16)/8 * 2 + k%2: the B registers b0..b1 of lane n*4+t.
// Global buffers hold all kMaxBatch rows; shared-memory copies only the step's batch rows.
__host__ __device__ constexpr int64_t act_fragment_index(int n, int64_t k, int rows = kMaxBatch) {
  const int64_t c = k % kKBlock;
  return (((k / kKBlock) * rows + n) * 4 + (c % 8) / 2) * 4 + (c / 8) * 2 + c % 2;
}

// Source row of packed row `row` under `order` (`param`: head_dim, or intermediate size).
__host__ __device__ constexpr int64_t source_row(RowOrder order, int64_t row, int64_t param) {
  const int64_t r = row % kRowBlock;
  switch (order) {
    case RowOrder::kRopePairs: {
      const int64_t head = row / param, j = (row % param) / kRowBlock;
      return head * param + (r < 8 ? 8 * j + r : param / 2 + 8 * j + r - 8);
    }
    case RowOrder::kGateUp: {
      const int64_t j = row / kRowBlock;
      return r < 8 ? 8 * j + r : param + 8 * j + r - 8;
    }
    default:
      return row;
  }
}

// D (16x8 fp32) += A (16x16 bf16 weight fragment) * B (16x8 bf16 activation fragment).
__device__ __forceinline__ void mma_fragment(float (&acc)[4], const uint4& a, const uint2& b) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(acc[0], acc[1], acc[2], acc[3], a.x, a.y, a.z, a.w, b.x, b.y,
                                           acc[0], acc[1], acc[2], acc[3]);
}

}  // namespace flashformer
