// Host-side rules of the Hopper TMA engine for 2-D tiles of a row-major matrix.
// Framework-free and CUDA-free, so host tests and launchers share one statement of them.
#pragma once

#include <cstdint>
#include <string>

namespace flashformer {

inline constexpr int kTmaMaxBoxDim = 256;             // elements per box dimension
inline constexpr int kTmaGlobalAlignBytes = 16;       // global base address and row stride
inline constexpr int kSwizzleBytes = 128;             // inner box extent under 128B swizzle
inline constexpr int kSwizzleAtomAlignBytes = 1024;   // smem alignment of a 128B-swizzled tile
inline constexpr int64_t kTmaMaxGlobalDim = int64_t{1} << 32;

// Empty when a row-major (rows, cols) matrix of `elem_bytes`-byte elements at `base` can be read
// by 2-D TMA; otherwise a sentence naming the violated rule.
inline std::string tma_2d_problem(std::uintptr_t base, int64_t rows, int64_t cols, int elem_bytes) {
  if (rows <= 0 || cols <= 0)
    return "matrix shape (" + std::to_string(rows) + ", " + std::to_string(cols) + ") is empty";
  if (rows >= kTmaMaxGlobalDim || cols >= kTmaMaxGlobalDim)
    return "a matrix dimension is 2^32 or more, beyond a TMA descriptor";
  if (base % kTmaGlobalAlignBytes != 0)
    return "base address is not 16-byte aligned";
  const int64_t stride_bytes = cols * elem_bytes;
  if (stride_bytes % kTmaGlobalAlignBytes != 0)
    return "row stride of " + std::to_string(stride_bytes) +
           " bytes is not a multiple of 16 (cols must be a multiple of " +
           std::to_string(kTmaGlobalAlignBytes / elem_bytes) + ")";
  return {};
}

}  // namespace flashformer
