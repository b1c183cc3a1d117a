// A bf16 weight tile streamed global -> shared memory by one TMA instruction group and
// completed on an mbarrier: the unit the megakernel's weight ring is built from.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>

#include "flashformer/tma_limits.hpp"

namespace flashformer {

using bf16 = cute::bfloat16_t;

// ROWS x COLS bf16, COLS (the reduction dim K) contiguous, 128-byte swizzle: the K-major operand
// layout wgmma reads, and bank-conflict free for the consumers' 16-byte reads.
template <int Rows, int Cols>
struct SwizzledTile {
  static constexpr int kRows = Rows;
  static constexpr int kCols = Cols;
  static constexpr int kBytes = Rows * Cols * int(sizeof(bf16));
  static_assert(Cols * int(sizeof(bf16)) % kSwizzleBytes == 0, "COLS must fill whole 128-byte swizzle rows");
  static_assert(Rows % 8 == 0, "ROWS must be a multiple of the 8-row swizzle atom");
  static_assert(Rows <= kTmaMaxBoxDim, "a TMA box has at most 256 rows");
  using Shape = cute::Shape<cute::Int<Rows>, cute::Int<Cols>>;
  using Layout = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<bf16>{}, Shape{}));  // (ROWS,COLS)
};

// Host: TMA descriptor (as a CuTe TiledCopy) reading a row-major (rows, cols) matrix in Tile boxes.
template <class Tile>
auto make_tile_tma(bf16 const* base, int rows, int cols) {
  using namespace cute;
  Tensor g = make_tensor(make_gmem_ptr(base), make_layout(make_shape(rows, cols), make_stride(cols, Int<1>{})));  // (rows,cols)
  return make_tma_copy(SM90_TMA_LOAD{}, g, typename Tile::Layout{});
}

// Device: the transaction barrier a single producer thread arms before issuing a tile's TMA.
using TmaBarrier = cutlass::arch::ClusterTransactionBarrier;

// Device, one thread: arm `bar` for one tile and issue the TMA of tile (tile_row, tile_col) of the
// matrix described by `tma` into `smem_tile`. Completion: TmaBarrier::wait(bar, phase).
template <class Tile, class Tma>
CUTE_DEVICE void issue_tile_load(Tma const& tma, int rows, int cols, int tile_row, int tile_col,
                                 bf16* smem_tile, uint64_t& bar) {
  using namespace cute;
  Tensor s = make_tensor(make_smem_ptr(smem_tile), typename Tile::Layout{});             // (ROWS,COLS)
  Tensor m = tma.get_tma_tensor(make_shape(rows, cols));                                  // (rows,cols) coords
  Tensor g = local_tile(m, typename Tile::Shape{}, make_coord(tile_row, tile_col));       // (ROWS,COLS)
  auto [tg, ts] = tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(s), group_modes<0, 2>(g));  // (TMA)
  TmaBarrier::arrive_and_expect_tx(&bar, Tile::kBytes);  // arm first: the TMA may complete at once
  copy(tma.with(bar), tg, ts);
}

}  // namespace flashformer
