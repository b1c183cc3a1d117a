// GPU tests of the kernels. Exit 77 (ctest: skipped) when no sm_90 device is visible.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "cuda_check.hpp"
#include "engine.hpp"
#include "kernels/launch.hpp"

namespace {

// bf16 bits of a float (round to nearest even); random normal data, never zeros.
uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

std::mt19937& rng() {
  static std::mt19937 gen = [] {
    const unsigned seed = std::random_device{}();
    std::printf("random seed %u\n", seed);
    return std::mt19937(seed);
  }();
  return gen;
}

// Copies a fresh random matrix through the TMA probe into a NaN-poisoned buffer; counts mismatches.
int64_t tma_roundtrip_mismatches(int64_t rows, int64_t cols) {
  const size_t n = size_t(rows * cols);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<uint16_t> host(n), back(n);
  for (auto& x : host) x = to_bf16_bits(normal(rng()));
  void *src = nullptr, *dst = nullptr;
  FF_CUDA_CHECK(cudaMalloc(&src, n * 2));
  FF_CUDA_CHECK(cudaMalloc(&dst, n * 2));
  FF_CUDA_CHECK(cudaMemcpy(src, host.data(), n * 2, cudaMemcpyHostToDevice));
  FF_CUDA_CHECK(cudaMemset(dst, 0xFF, n * 2));  // 0xFFFF is a bf16 NaN: any unwritten element fails
  flashformer::tma_tile_copy(src, dst, rows, cols, nullptr);
  FF_CUDA_CHECK(cudaDeviceSynchronize());
  FF_CUDA_CHECK(cudaMemcpy(back.data(), dst, n * 2, cudaMemcpyDeviceToHost));
  FF_CUDA_CHECK(cudaFree(src));
  FF_CUDA_CHECK(cudaFree(dst));
  int64_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad += host[i] != back[i];
  if (bad) std::printf("  %lld of %zu elements differ for (%lld, %lld)\n", (long long)bad, n, (long long)rows, (long long)cols);
  return bad;
}

}  // namespace

FF_TEST(engine_binds_to_hopper_device) {
  flashformer::Engine engine(0);
  FF_CHECK(engine.device().supported());
  FF_CHECK(engine.device().sm_count > 0);
  FF_CHECK(engine.device().smem_per_block_optin >= 227 * 1024);
}

FF_TEST(tma_tile_copy_is_exact_on_whole_tiles) { FF_CHECK(tma_roundtrip_mismatches(64, 64) == 0); FF_CHECK(tma_roundtrip_mismatches(256, 512) == 0); }

FF_TEST(tma_tile_copy_is_exact_on_ragged_edges) {
  FF_CHECK(tma_roundtrip_mismatches(200, 392) == 0);  // partial tiles in both dims: TMA bounds
  FF_CHECK(tma_roundtrip_mismatches(1, 8) == 0);      // a single 16-byte row
}

FF_TEST(tma_tile_copy_is_exact_on_a_weight_sized_matrix) { FF_CHECK(tma_roundtrip_mismatches(4096, 4096) == 0); }

FF_TEST(tma_tile_copy_rejects_unaligned_rows) {
  void* p = nullptr;
  FF_CUDA_CHECK(cudaMalloc(&p, 64 * 12 * 2));
  bool threw = false;
  try {
    flashformer::tma_tile_copy(p, p, 64, 12, nullptr);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  FF_CUDA_CHECK(cudaFree(p));
  FF_CHECK(threw);
}

int main() {
  if (!flashformer::cuda_available()) {
    std::printf("SKIP: no CUDA device of compute capability 9.0 is visible\n");
    return 77;
  }
  return fftest::run_all();
}
