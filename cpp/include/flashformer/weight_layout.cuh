// The fragment order of weights and activations: a 16x16 bf16 weight fragment is 512 bytes
// in which lane l (g = l/4, t = l%4) finds its four mma.m16n8k16 A registers as one 16-byte
// vector (a 16x32 e4m3 fragment: its four mma.m16n8k32 A registers, one byte an element), and
// an activation k-block is 256 bytes in which lane l finds its two B registers (batch column g)
// as one 8-byte vector (for e4m3 weights a 32-k block of f16, 16 bytes a lane). One conflict-free
// shared-memory or coalesced global load per fragment; no ldmatrix, no swizzle. Weights are packed
// once at load time.
//
// The tensor cores multiply bf16 weights by bf16 activations, and e4m3 weights (turned into f16,
// exactly, by one cvt per pair) by f16 activations. An activation fragment is therefore written in
// the format of the matmul that reads it (Activations<F>): f16 activations carry a factor
// 2^-kF16ActivationShift, which the e4m3 row scales undo, so that values up to 1.7e7 fit f16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include <cute/arch/mma_sm80.hpp>

#include "flashformer/fragment_layout.hpp"
#include "flashformer/kernel_config.hpp"

namespace flashformer {

// The activation elements a matmul on weights of format F reads: bf16 for bf16 weights, f16
// times 2^-kF16ActivationShift for e4m3 weights (f16 keeps 11 significant bits where bf16 keeps 8;
// the shift keeps the largest activations finite).
inline constexpr int kF16ActivationShift = 8;
template <WeightFormat F>
struct Activations {
  // Two adjacent elements (a, b) as one 32-bit register of a B fragment.
  __device__ static uint32_t pair(float a, float b) {
    if constexpr (F == WeightFormat::kFp8) {
      constexpr float kScale = 1.f / float(1 << kF16ActivationShift);
      const __half2 h = __floats2half2_rn(a * kScale, b * kScale);
      return *reinterpret_cast<const uint32_t*>(&h);
    } else {
      const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
      return *reinterpret_cast<const uint32_t*>(&h);
    }
  }
  // One element, as the 16 bits it is stored in.
  __device__ static uint16_t one(float a) {
    if constexpr (F == WeightFormat::kFp8) {
      const __half h = __float2half_rn(a * (1.f / float(1 << kF16ActivationShift)));
      return *reinterpret_cast<const uint16_t*>(&h);
    } else {
      const __nv_bfloat16 h = __float2bfloat16(a);
      return *reinterpret_cast<const uint16_t*>(&h);
    }
  }
  // What the matmul's fp32 sums are multiplied by to undo the activations' factor.
  static constexpr float kUnscale = F == WeightFormat::kFp8 ? float(1 << kF16ActivationShift) : 1.f;
};

// D (16x8 fp32) += A (16x16 weight fragment) * B (16x8 activation fragment), both bf16 (F =
// kBf16) or both f16 (kFp8: the e4m3 weights after dequant_fp8_fragment).
template <WeightFormat F = WeightFormat::kBf16>
__device__ __forceinline__ void mma_fragment(float (&acc)[4], const uint4& a, const uint2& b) {
  using Mma = std::conditional_t<F == WeightFormat::kFp8, cute::SM80_16x8x16_F32F16F16F32_TN,
                                 cute::SM80_16x8x16_F32BF16BF16F32_TN>;
  Mma::fma(acc[0], acc[1], acc[2], acc[3], a.x, a.y, a.z, a.w, b.x, b.y, acc[0], acc[1], acc[2], acc[3]);
}

// The f16 pair of the two e4m3 values in the low (hi = false) or high 16 bits of w: exact (every
// e4m3 value, subnormals included, is an f16).
template <bool kHigh>
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t w) {
  uint32_t d;
  if constexpr (kHigh)
    asm("{ .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, hi;\n }" : "=r"(d) : "r"(w));
  else
    asm("{ .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n }" : "=r"(d) : "r"(w));
  return d;
}

// One lane's 16 bytes of an e4m3 fragment (fp8_weight_fragment_index: the m16n8k32 A registers,
// rows g and g+8 alternating, four k each) as the A registers of two m16n8k16 halves in f16, the
// exact e4m3 values (the row scales come after the matmul): a half's registers are rows g, g+8 of
// its first k pair, then of its second (the low and high 16 bits of q.x, q.y; of q.z, q.w for the
// high half). Its B registers are x, y (z, w) of the lane's activation vector (fp8_act_fragment_index).
__device__ __forceinline__ void dequant_fp8_fragment(const uint4& q, uint4& lo, uint4& hi) {
  lo = make_uint4(e4m3x2_to_f16x2<false>(q.x), e4m3x2_to_f16x2<false>(q.y), e4m3x2_to_f16x2<true>(q.x),
                  e4m3x2_to_f16x2<true>(q.y));
  hi = make_uint4(e4m3x2_to_f16x2<false>(q.z), e4m3x2_to_f16x2<false>(q.w), e4m3x2_to_f16x2<true>(q.z),
                  e4m3x2_to_f16x2<true>(q.w));
}

}  // namespace flashformer
