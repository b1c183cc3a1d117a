// RMSNorm of the residual stream into shared memory, in the mma B-fragment order. Every CTA
// recomputes it on the whole hidden vector it needs: 8-64 KB from L2 beats a grid-wide sync.
#pragma once

#include "flashformer/context.cuh"
#include "flashformer/weight_layout.cuh"

namespace flashformer {

// RMSNorm inputs: the attention norm of layer l is norm 2l, the MLP norm 2l+1, the final norm
// 2L. The op that writes rows of x for norm n leaves its SM's sum of their squares (per batch
// row) in sq_part[n][sm], so a norm needs no pass over x to find its scale.
__device__ inline float* sq_part_of(const MegakernelParams& p, int norm) {
  return p.scratch.sq_part + int64_t(norm) * gridDim.x * kMaxBatch;
}

// Warp 0 of an op that wrote rows of x: lanes hold partial sums of squares for batch columns
// 2t, 2t+1 (t = lane % 4) over their rows; reduce them and publish this SM's share.
__device__ inline void publish_sq_part(const MegakernelParams& p, int norm, int lane, const float (&sq)[2]) {
  float s[2] = {sq[0], sq[1]};
#pragma unroll
  for (int q = 0; q < 2; ++q)
#pragma unroll
    for (int off = 4; off < kWarpSize; off *= 2) s[q] += __shfl_xor_sync(0xffffffffu, s[q], off);
  if (lane < 4)
#pragma unroll
    for (int q = 0; q < 2; ++q)
      if (2 * lane + q < p.batch) sq_part_of(p, norm)[blockIdx.x * kMaxBatch + 2 * lane + q] = s[q];
}

// RMSNorm of x (norm `norm`, its rows written by task `writer`) times `weight`, into this CTA's
// shared memory in B-fragment order, as the activations of a matmul on format-F weights
// (weight_layout.cuh's Activations). Every CTA does it for the whole vector it needs: 8-64 KB
// from L2 beats a grid-wide sync.
template <class T, WeightFormat F>
__device__ void rmsnorm_to_fragments(Consumer<T>& c, const bf16_t* weight, int norm, int writer) {
  if (variant_on<T>(c.p, kSkipNorm)) return;
  constexpr int kVecs = T::kHidden / 4;  // float4 per batch row
  static_assert(T::kHidden % 4 == 0, "rows are read as float4");
  const MegakernelParams& p = c.p;
  // (batch, hidden) fp32, written by other CTAs this step: read through L2
  const float4* x = reinterpret_cast<const float4*>(p.scratch.x);
  const uint2* w4 = reinterpret_cast<const uint2*>(weight);  // 4 bf16 per float4 of x
  // kInFlight float4 of x (and their weights) per thread at a time over the flattened (row,
  // vector) range. The first ones are loaded before the scale's sum, so both round trips overlap.
  constexpr int kInFlight = 4;
  const int total = p.batch * kVecs;
  float4 a[kInFlight];
  uint2 wu[kInFlight];
  auto load = [&](int j0) {
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int j = j0 + u * kConsumerThreads;
      if (j < total) a[u] = __ldcg(x + j), wu[u] = w4[j % kVecs];
    }
  };
  load(c.tid);
  // Warp b sums row b's partials over the SMs that wrote rows, in a fixed order (every CTA gets
  // the same scale).
  if (c.warp < p.batch) {
    const float* part = sq_part_of(p, norm);
    float s = 0.f;
    for (int sm = c.lane; sm < int(gridDim.x); sm += kWarpSize) {
      const float v = __ldcg(part + sm * kMaxBatch + c.warp);     // loaded with the schedule, not after it
      if (owns_units(p, writer, sm)) s += v;         // (slots of SMs without rows are stale)
    }
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (c.lane == 0) c.rinv[c.warp] = rsqrtf(s / T::kHidden + p.rms_eps);
  }
  c.sync();  // rinv visible
  auto put = [&](int b, int v, float4 a, uint2 wu) {
    const float r = c.rinv[b];
    const float2 w01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wu.x));
    const float2 w23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wu.y));
    // k = 4v .. 4v+3: two adjacent pairs in fragment order
    *reinterpret_cast<uint32_t*>(c.act + act_pair_index<F>(b, 4 * v, p.batch)) =
        Activations<F>::pair(a.x * r * w01.x, a.y * r * w01.y);
    *reinterpret_cast<uint32_t*>(c.act + act_pair_index<F>(b, 4 * v + 2, p.batch)) =
        Activations<F>::pair(a.z * r * w23.x, a.w * r * w23.y);
  };
  for (int j0 = c.tid; j0 < total; j0 += kInFlight * kConsumerThreads) {
    if (j0 != c.tid) load(j0);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int j = j0 + u * kConsumerThreads;
      if (j < total) put(j / kVecs, j % kVecs, a[u], wu[u]);
    }
  }
  c.sync();  // the fragments are complete before any warp loads them
}

// The per-head RMSNorm of q and k (kQkNorm): the qkv op's epilogue leaves, for each 16-row
// block of a q or k head (heads numbered q first, then k) and batch row, the sum of squares of
// its rows; whoever reads the head (attention) sums them into the head's scale. A head's blocks
// run on any SMs, so the scale comes after the op's signal, not in its epilogue.
template <class T>
__device__ float* head_sq_of(const MegakernelParams& p, int b, int head) {
  return p.scratch.qk_sq + (int64_t(b) * (T::kHeads + T::kKvHeads) + head) * (T::kHeadDim / kRowBlock);
}
template <class T>
__device__ float head_rms_scale(const MegakernelParams& p, int b, int head) {
  const float* part = head_sq_of<T>(p, b, head);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < T::kHeadDim / kRowBlock; ++j) sum += __ldcg(part + j);
  return rsqrtf(sum / T::kHeadDim + p.rms_eps);
}

}  // namespace flashformer
