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
// [row/16][col/32][lane = g*4 + t][16 bytes], g = row%8, t = (col%16)/4. The lane's bytes are the A
// registers a0..a3 of mma.m16n8k32 on e4m3, four elements each: register (col%32)/16 * 2 +
// (row%16)/8, element col%4. The dequantizing matmul turns each register's two 16-bit halves into
// f16 pairs, the A registers of two m16n8k16 halves over the same k order (weight_layout.cuh), so
// its activations follow fp8_act_fragment_index.
constexpr int64_t fp8_weight_fragment_index(int64_t row, int64_t col, int64_t K) {
  constexpr int64_t kCols = 2 * kKBlock;
  const int64_t r = row % kRowBlock, c = col % kCols;
  const int64_t lane = (r % 8) * 4 + (c % 16) / 4;
  const int64_t byte = ((c / 16) * 2 + r / 8) * 4 + c % 4;
  return (((row / kRowBlock) * (K / kCols) + col / kCols) * kWarpSize + lane) * 16 + byte;
}

// Where byte i of lane (g, t) of an e4m3 fragment sits in it (row 0..15, col 0..31):
// fp8_weight_fragment_index inverted (the pack and unpack kernels).
struct FragmentElement {
  int row, col;
};
constexpr FragmentElement fp8_fragment_element(int g, int t, int i) {
  const int reg = i / 4;
  return {(reg % 2) * 8 + g, (reg / 2) * 16 + 4 * t + i % 4};
}

// Element index of activation a[n][k] (batch row n of `rows`, K columns) in fragment order:
// [k/16][n][t][e], t = (k%8)/2, e = (k%16)/8 * 2 + k%2: the B registers b0..b1 of lane n*4+t.
// Global buffers hold all kMaxBatch rows; shared-memory copies only the step's batch rows.
constexpr int64_t act_fragment_index(int n, int64_t k, int rows = kMaxBatch) {
  const int64_t c = k % kKBlock;
  return (((k / kKBlock) * rows + n) * 4 + (c % 8) / 2) * 4 + (c / 8) * 2 + c % 2;
}

// Element index of activation a[n][k] for a matmul on e4m3 weights (fp8_weight_fragment_index's k
// order): [k/32][n][t][e], t = (k%16)/4, e = (k%32)/16 * 4 + k%4: lane n*4+t's 8 elements of a 32-k
// fragment as one vector (f16: 16 bytes), elements 0-3 the k of its A registers a0, a1, 4-7 those of
// a2, a3 (the dequantizing matmul's halves take registers x, y and z, w of it).
constexpr int64_t fp8_act_fragment_index(int n, int64_t k, int rows = kMaxBatch) {
  constexpr int64_t kCols = 2 * kKBlock;
  const int64_t c = k % kCols;
  return (((k / kCols) * rows + n) * 4 + (c % 16) / 4) * 8 + (c / 16) * 4 + c % 4;
}

// The activation order of a matmul on format-F weights.
template <WeightFormat F>
constexpr int64_t act_index(int n, int64_t k, int rows = kMaxBatch) {
  return F == WeightFormat::kFp8 ? fp8_act_fragment_index(n, k, rows) : act_fragment_index(n, k, rows);
}

// The B registers of lane (g, t) for weight fragment f as one vector: bf16, the uint2 index of
// act_fragment_index(g, 16 f + 2t, rows); e4m3 (f16 activations), the uint4 index of
// fp8_act_fragment_index(g, 32 f + 4t, rows). Plain int arithmetic, so the inner loop's address is
// one multiply-add per fragment.
constexpr int act_lane_vector(int f, int g, int t, int rows = kMaxBatch) {
  return (f * rows + g) * 4 + t;
}

// act_index<F>(n, k, rows) for even k (a pair's first element), in int arithmetic.
template <WeightFormat F>
constexpr int act_pair_index(int n, int k, int rows) {
  if (F == WeightFormat::kFp8) return ((k >> 5) * rows + n) * 32 + ((k & 15) >> 2) * 8 + ((k >> 4) & 1) * 4 + (k & 3);
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
