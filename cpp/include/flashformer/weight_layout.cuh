// The fragment order of weights and activations: a 16x16 bf16 weight fragment is 512 bytes
// in which lane l (g = l/4, t = l%4) finds its four mma.m16n8k16 A registers as one 16-byte
// vector, and an activation k-block is 256 bytes in which lane l finds its two B registers
// (batch column g) as one 8-byte vector. One conflict-free shared-memory or coalesced global
// load per fragment; no ldmatrix, no swizzle. Weights are packed once at load time.
#pragma once

#include <cute/arch/mma_sm80.hpp>

#include "flashformer/fragment_layout.hpp"
#include "flashformer/kernel_config.hpp"

namespace flashformer {

// D (16x8 fp32) += A (16x16 bf16 weight fragment) * B (16x8 bf16 activation fragment).
__device__ __forceinline__ void mma_fragment(float (&acc)[4], const uint4& a, const uint2& b) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(acc[0], acc[1], acc[2], acc[3], a.x, a.y, a.z, a.w, b.x, b.y,
                                           acc[0], acc[1], acc[2], acc[3]);
}

}  // namespace flashformer
