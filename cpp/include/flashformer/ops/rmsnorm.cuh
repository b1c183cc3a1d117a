// RMSNorm of the residual stream into shared memory, in the mma B-fragment order. Every CTA
// recomputes it on the whole hidden vector it needs: 8-64 KB from L2 beats a grid-wide sync.
#pragma once

#include "flashformer/ops/context.cuh"
#include "flashformer/weight_layout.cuh"

namespace flashformer {

template <class T>
__device__ void rmsnorm_to_fragments(Consumer<T>& c, const bf16_t* weight) {
  if (c.p.timing_variant & kSkipNorm) return;
  constexpr int kVecs = T::kHidden / 4;  // float4 per batch row
  constexpr int kPerThread = (kVecs + kConsumerThreads - 1) / kConsumerThreads;
  static_assert(T::kHidden % 4 == 0, "rows are read as float4");
  // (batch, hidden) fp32, written by other CTAs: read through L2, every load of a row in flight
  const float4* x = reinterpret_cast<const float4*>(c.p.scratch.x);
  float* partial = c.reduce;  // (warps, kMaxBatch): the reduction buffers are free between row blocks
  float4 row0[kPerThread];    // batch row 0 stays in registers: its second pass needs no L2 round trip
  for (int b = 0; b < c.p.batch; ++b) {
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int v = c.tid + i * kConsumerThreads;
      if (v < kVecs) {
        const float4 a = __ldcg(x + b * kVecs + v);
        if (b == 0) row0[i] = a;
        sq += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
      }
    }
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (c.lane == 0) partial[c.warp * kMaxBatch + b] = sq;
  }
  c.sync();  // partial sums visible
  if (c.tid < c.p.batch) {
    float s = 0.f;
    for (int w = 0; w < kConsumerWarps; ++w) s += partial[w * kMaxBatch + c.tid];
    c.rinv[c.tid] = rsqrtf(s / T::kHidden + c.p.rms_eps);
  }
  c.sync();  // rinv visible; partial free again
  const uint2* w4 = reinterpret_cast<const uint2*>(weight);  // 4 bf16 per float4 of x
  for (int b = 0; b < c.p.batch; ++b) {
    const float r = c.rinv[b];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int v = c.tid + i * kConsumerThreads;
      if (v < kVecs) {
        const float4 a = b == 0 ? row0[i] : __ldcg(x + b * kVecs + v);
        const uint2 wu = w4[v];
        const float2 w01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wu.x));
        const float2 w23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wu.y));
        // k = 4v .. 4v+3: two adjacent pairs in fragment order
        *reinterpret_cast<__nv_bfloat162*>(c.act + act_fragment_index(b, 4 * v, c.p.batch)) =
            __floats2bfloat162_rn(a.x * r * w01.x, a.y * r * w01.y);
        *reinterpret_cast<__nv_bfloat162*>(c.act + act_fragment_index(b, 4 * v + 2, c.p.batch)) =
            __floats2bfloat162_rn(a.z * r * w23.x, a.w * r * w23.y);
      }
    }
  }
  c.sync();  // the fragments are complete before any warp loads them
}

}  // namespace flashformer
