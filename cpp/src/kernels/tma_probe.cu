// Kernel test of the TMA tile load (cpp/include/flashformer/tma_tile.cuh): matrix -> smem -> matrix.
#include <stdexcept>

#include "cuda_check.hpp"
#include "flashformer/tma_tile.cuh"
#include "kernels/launch.hpp"

namespace flashformer {
namespace {

using ProbeTile = SwizzledTile<64, 64>;
constexpr int kProbeThreads = 128;

template <class Tile, class Tma>
__global__ void __launch_bounds__(kProbeThreads)
tma_tile_copy_kernel(CUTE_GRID_CONSTANT Tma const tma, bf16* dst, int rows, int cols) {
  using namespace cute;
  __shared__ alignas(kSwizzleAtomAlignBytes) bf16 tile[cosize_v<typename Tile::Layout>];
  __shared__ alignas(8) uint64_t bar;

  if (threadIdx.x == 0) {
    TmaBarrier::init(&bar, 1);
    cutlass::arch::fence_barrier_init();  // make the init visible to the async (TMA) proxy
  }
  __syncthreads();  // no thread may wait on the barrier before it is initialised

  if (threadIdx.x == 0) issue_tile_load<Tile>(tma, rows, cols, blockIdx.x, blockIdx.y, tile, bar);
  TmaBarrier::wait(&bar, 0);  // phase 0 completes when all Tile::kBytes have landed

  Tensor s = make_tensor(make_smem_ptr(tile), typename Tile::Layout{});  // (ROWS,COLS) swizzled
  const int row0 = blockIdx.x * Tile::kRows, col0 = blockIdx.y * Tile::kCols;
  for (int i = threadIdx.x; i < Tile::kRows * Tile::kCols; i += blockDim.x) {
    const int r = i / Tile::kCols, c = i % Tile::kCols;
    if (row0 + r < rows && col0 + c < cols) dst[int64_t(row0 + r) * cols + col0 + c] = s(r, c);
  }
}

}  // namespace

void tma_tile_copy(const void* src, void* dst, int64_t rows, int64_t cols, cudaStream_t stream) {
  const std::string problem = tma_2d_problem(reinterpret_cast<std::uintptr_t>(src), rows, cols, sizeof(bf16));
  if (!problem.empty()) throw std::invalid_argument("tma_tile_copy: " + problem);
  for (const void* p : {src, static_cast<const void*>(dst)}) {
    cudaPointerAttributes attr{};
    FF_CUDA_CHECK(cudaPointerGetAttributes(&attr, p));
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      throw std::invalid_argument("tma_tile_copy: src and dst must be device memory");
  }
  if (rows > (int64_t{1} << 31) - 1 || cols > (int64_t{1} << 31) - 1)
    throw std::invalid_argument("tma_tile_copy: dimensions must fit in int32");
  auto tma = make_tile_tma<ProbeTile>(static_cast<const bf16*>(src), int(rows), int(cols));
  const dim3 grid((rows + ProbeTile::kRows - 1) / ProbeTile::kRows, (cols + ProbeTile::kCols - 1) / ProbeTile::kCols);
  if (grid.y > 65535) throw std::invalid_argument("tma_tile_copy: too many column tiles");
  tma_tile_copy_kernel<ProbeTile><<<grid, kProbeThreads, 0, stream>>>(tma, static_cast<bf16*>(dst), int(rows), int(cols));
  FF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashformer
