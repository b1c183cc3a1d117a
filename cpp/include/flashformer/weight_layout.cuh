// The fragment order of weights and activations: a 16x16 bf16 weight fragment is 512 bytes
// in which lane l (g = l/4, t = l%4) finds its four mma.m16n8k16 A registers as one 16-byte
// vector (a 16x32 e4m3 fragment: the registers of its two 16x16 halves, one byte an element), and an activation k-block is 256 bytes in which lane l finds its two B registers
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

// bf16 pair (low, high) of the e4m3 values in bytes 1 and 3 of w, times 2^-120: the e4m3 sign,
// exponent and mantissa moved into bf16's fields (exact, subnormals included: both formats' value
// is 2^(e - bias) (1.m) or 2^(1 - bias) (0.m), and the biases differ by 120).
__device__ __forceinline__ uint32_t e4m3_odd_bytes_rebiased(uint32_t w) {
  return (w & 0x80008000u) | ((w & 0x7F007F00u) >> 4);
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// One lane's 16 bytes of an e4m3 fragment (fp8_weight_fragment_index) as the A registers of its
// two 16x16 halves, in bf16: the exact e4m3 values (the row scales come after the matmul).
__device__ __forceinline__ void dequant_fp8_fragment(const uint4& q, uint4& lo, uint4& hi) {
  constexpr uint32_t kRebias = 0x7B807B80u;  // bf16 2^120, twice: undoes the 2^-120
  auto pair = [](uint32_t w) { return bf16x2_mul(e4m3_odd_bytes_rebiased(w), kRebias); };
  lo = make_uint4(pair(q.x), pair(q.y), pair(q.x << 8), pair(q.y << 8));
  hi = make_uint4(pair(q.z), pair(q.w), pair(q.z << 8), pair(q.w << 8));
}

}  // namespace flashformer
