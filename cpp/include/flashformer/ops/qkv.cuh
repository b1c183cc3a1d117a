// RMSNorm + QKV projection + RoPE + KV-cache append. Packed rows keep each RoPE pair (d, d+D/2)
// in rows g and g+8 of one block, so the rotation happens in the accumulator registers.
#pragma once

#include "flashformer/op.hpp"
#ifdef __CUDACC__
#include "flashformer/gemv.cuh"
#endif

namespace flashformer {

#ifdef __CUDACC__
template <class T>
struct QkvEpilogue {
  static constexpr int D = T::kHeadDim;
  Consumer<T>& c;
  int layer;
  int pos[2] = {0, 0};  // warp 0 (the epilogue's warp): positions of this lane's batch columns 2t, 2t+1
  float cs[2], sn[2];   // their RoPE cos/sin at the row block's frequency, loaded by prefetch
  __device__ QkvEpilogue(Consumer<T>& c_, int layer_) : c(c_), layer(layer_) {
    if (c.warp != 0) return;
#pragma unroll
    for (int q = 0; q < 2; ++q)
      if (2 * (c.lane % 4) + q < c.p.batch) pos[q] = c.shape->positions[2 * (c.lane % 4) + q];
  }
  __device__ static int freq(int rb, int g) { return 8 * ((rb * kRowBlock % D) / kRowBlock) + g; }  // < D/2

  __device__ void prefetch(int rb) {
    const int i = freq(rb, c.lane / 4);
#pragma unroll
    for (int q = 0; q < 2; ++q)
      cs[q] = c.p.rope_cos[int64_t(pos[q]) * (D / 2) + i], sn[q] = c.p.rope_sin[int64_t(pos[q]) * (D / 2) + i];
  }

  __device__ void row_block(int rb, const AccTile& acc) {
    const MegakernelParams& p = c.p;
    const int g = c.lane / 4, t = c.lane % 4;
    const int head = rb * kRowBlock / D;  // among q heads, then k, then v
    const int i = freq(rb, g);            // RoPE frequency index
    // q is pre-scaled so attention can use exp2: softmax(s) = exp2(s * log2(e)) / ...
    const float q_scale = 1.4426950408889634f * rsqrtf(float(D));
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int n = 2 * t + q;
      if (n >= p.batch) continue;
      const float lo = acc[q], hi = acc[2 + q];  // dims i and i + D/2
      const float rlo = lo * cs[q] - hi * sn[q], rhi = hi * cs[q] + lo * sn[q];
      if (head < T::kHeads) {
        float* qn = p.scratch.q + (int64_t(n) * T::kHeads + head) * D;
        qn[i] = rlo * q_scale;
        qn[i + D / 2] = rhi * q_scale;
      } else if (head < T::kHeads + T::kKvHeads) {
        bf16_t* k = p.kv_cache + kv_index<T>(p, layer, 0, n, head - T::kHeads, pos[q]);
        k[i] = __float2bfloat16(rlo);
        k[i + D / 2] = __float2bfloat16(rhi);
      } else {
        bf16_t* v = p.kv_cache + kv_index<T>(p, layer, 1, n, head - T::kHeads - T::kKvHeads, pos[q]);
        v[i] = __float2bfloat16(lo);
        v[i + D / 2] = __float2bfloat16(hi);
      }
    }
  }
  __device__ void finish() {}
};

#endif

struct QkvOp : OpDefaults {
  static constexpr const char* kName = "qkv";
  static constexpr int units(const ModelDims& d, int) { return d.qkv_rows() / kRowBlock; }
  static constexpr int64_t unit_bytes(const ModelDims& d) { return row_block_bytes(d.hidden); }

#ifdef __CUDACC__
  template <class T>
  __device__ static bool produce(Producer<T>& pr, Task task, int u0, int u1) {
    return stream_row_blocks(pr, pr.p.layers[task.layer].qkv, T::kHidden, u0, u1);
  }
  // x was last written by the task before (the previous layer's down projection, or the embedding)
  template <class T>
  __device__ static bool consume(Consumer<T>& c, Task task, int u0, int u1) {
    return norm_then_matmul<T, QkvEpilogue<T>>(c, c.p.layers[task.layer].attn_norm, 2 * task.layer, task, u0, u1);
  }
#endif
};

}  // namespace flashformer
