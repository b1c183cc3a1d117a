// RMSNorm of the residual stream into shared memory, in the mma B-fragment order. Every CTA
// recomputes it on the whole hidden vector it needs: 8-64 KB from L2 beats a grid-wide sync.
#pragma once

#include "flashformer/ops/context.cuh"
#include "flashformer/weight_layout.cuh"

namespace flashformer {

template <class T>
__device__ void rmsnorm_to_fragments(Consumer<T>& c, const bf16_t* weight) {
  const float* x = c.p.scratch.x;  // (batch, hidden) fp32, written by other CTAs: read through L2
  float sq[kMaxBatch];
#pragma unroll
  for (int b = 0; b < kMaxBatch; ++b) {
    sq[b] = 0.f;
    if (b < c.p.batch)
      for (int k = c.tid; k < T::kHidden; k += kConsumerThreads) {
        const float v = __ldcg(x + b * T::kHidden + k);
        sq[b] += v * v;
      }
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) sq[b] += __shfl_xor_sync(0xffffffffu, sq[b], off);
  }
  float* partial = c.reduce;  // (warps, kMaxBatch): the reduction buffers are free between row blocks
  if (c.lane == 0)
#pragma unroll
    for (int b = 0; b < kMaxBatch; ++b) partial[c.warp * kMaxBatch + b] = sq[b];
  c.sync();  // partial sums visible
  if (c.tid < kMaxBatch) {
    float s = 0.f;
    for (int w = 0; w < kConsumerWarps; ++w) s += partial[w * kMaxBatch + c.tid];
    c.rinv[c.tid] = rsqrtf(s / T::kHidden + c.p.rms_eps);
  }
  c.sync();  // rinv visible; partial free again
  for (int i = c.tid; i < c.p.batch * T::kHidden; i += kConsumerThreads) {
    const int b = i / T::kHidden, k = i % T::kHidden;
    const float v = __ldcg(x + i) * c.rinv[b] * __bfloat162float(weight[k]);
    c.act[act_fragment_index(b, k)] = __float2bfloat16(v);
  }
  c.sync();  // the fragments are complete before any warp loads them
}

}  // namespace flashformer
