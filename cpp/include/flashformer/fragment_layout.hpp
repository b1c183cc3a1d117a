// The fragment order of weights and activations (index arithmetic only; host-visible, so the
// packer, the tests and the kernel share it). weight_layout.cuh says why this order.
#pragma once

#include <cstdint>
#include <string>

#include "flashformer/kernel_config.hpp"

namespace flashformer {

// Element index of W[row][col] (K columns) in fragment order:
// [row/16][col/16][lane = g*4 + t][e], e = (col%16)/8 * 4 + (row%16)/8 * 2 + col%2,
// with g = row%8 and t = (col%8)/2: registers a0..a3 of the PTX mma fragment, in order.
constexpr int64_t weight_fragment_index(int64_t row, int64_t col, int64_t K) {
  const int64_t r = row % kRowBlock, c = col % kKBlock;
  const int64_t lane = (r % 8) * 4 + (c % 8) / 2;
  const int64_t e = (c / 8) * 4 + (r / 8) * 2 + c % 2;
  return (((row / kRowBlock) * (K / kKBlock) + col / kKBlock) * kWarpSize + lane) * 8 + e;
}

// Byte index of e4m3 W[row][col] (K columns, a multiple of 32) in fragment order: 16x32 fragments
// [row/16][col/32][lane = g*4 + t][16 bytes]. The lane's bytes are the A registers a0..a3 of the
// fragment's two 16x16 halves (h = (col%32)/16), 8 bytes a half, a register's pair of elements in
// each 16 bits (weight_layout.cuh turns each into an f16 pair with one cvt): register
// (col%16)/8 * 2 + (row%16)/8, element col%2, as weight_fragment_index's e.
constexpr int64_t fp8_weight_fragment_index(int64_t row, int64_t col, int64_t K) {
  constexpr int64_t kCols = 2 * kKBlock;
  const int64_t r = row % kRowBlock, c = col % kCols, h = c / kKBlock, cc = c % kKBlock;
  const int64_t lane = (r % 8) * 4 + (cc % 8) / 2;
  const int64_t byte = h * 8 + ((cc / 8) * 2 + r / 8) * 2 + cc % 2;
  return (((row / kRowBlock) * (K / kCols) + col / kCols) * kWarpSize + lane) * 16 + byte;
}

// Element index of activation a[n][k] (batch row n of `rows`, K columns) in fragment order:
// [k/16][n][t][e], t = (k%8)/2, e = (k%16)/8 * 2 + k%2: the B registers b0..b1 of lane n*4+t.
// Global buffers hold all kMaxBatch rows; shared-memory copies only the step's batch rows.
constexpr int64_t act_fragment_index(int n, int64_t k, int rows = kMaxBatch) {
  const int64_t c = k % kKBlock;
  return (((k / kKBlock) * rows + n) * 4 + (c % 8) / 2) * 4 + (c / 8) * 2 + c % 2;
}

// The B registers of lane (g, t) for k block kb as one 8-byte vector: the uint2 index of
// act_fragment_index(g, 16 kb + 2t, rows). Plain int arithmetic, so the inner loop's address is
// one multiply-add per fragment.
constexpr int act_lane_vector(int kb, int g, int t, int rows = kMaxBatch) {
  return (kb * rows + g) * 4 + t;
}

// act_fragment_index(n, k, rows) for even k (a bf16 pair's first element), in int arithmetic.
constexpr int act_pair_index(int n, int k, int rows) {
  return ((k >> 4) * rows + n) * 16 + ((k & 7) >> 1) * 4 + ((k >> 3) & 1) * 2;
}

// Source row of packed row `row` under `order` (`param`: head_dim, or intermediate size).
constexpr int64_t source_row(RowOrder order, int64_t row, int64_t param) {
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

// Why a (rows, cols) matrix cannot be packed in `row_order` with `param` (source_row's), or ""
// (host code: the pack and unpack launchers, and Python through the binding, check with it).
inline std::string pack_shape_problem(int64_t rows, int64_t cols, int row_order, int64_t param,
                                      WeightFormat format = WeightFormat::kBf16) {
  if (rows <= 0 || cols <= 0 || rows % kRowBlock || cols % kKBlock)
    return "shape (" + std::to_string(rows) + ", " + std::to_string(cols) +
           ") is not a positive multiple of 16 in both dimensions";
  if (format == WeightFormat::kFp8 && cols % (kKBlock * fragment_kblocks(format)))
    return "an e4m3 matrix needs a multiple of 32 columns, got " + std::to_string(cols);
  if (row_order < 0 || row_order > int(RowOrder::kGateUp)) return "unknown row order " + std::to_string(row_order);
  if (RowOrder(row_order) == RowOrder::kRopePairs && (param <= 0 || param % 32 || rows % param))
    return "RoPE row order needs head_dim a multiple of 32 dividing the rows, got head_dim " + std::to_string(param) +
           " and " + std::to_string(rows) + " rows";
  if (RowOrder(row_order) == RowOrder::kGateUp && (param <= 0 || param % 8 || rows != 2 * param))
    return "gate/up row order needs rows == 2 * intermediate, got " + std::to_string(rows) + " rows and intermediate " +
           std::to_string(param);
  return "";
}

}  // namespace flashformer
