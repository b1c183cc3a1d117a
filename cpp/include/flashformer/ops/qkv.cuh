// RMSNorm + QKV projection (+ biases) + RoPE + KV-cache append. Packed rows keep each RoPE pair
// (d, d+D/2) in rows g and g+8 of one block, so the rotation happens in the accumulator
// registers. With q/k norm (kQkNorm) the head's RMSNorm scale needs all of its row blocks, which
// run on several SMs: this op leaves the rest of the norm to attention (rmsnorm.cuh's
// head_rms_scale), which also appends the normed k to the cache. With an FP8 KV cache (T::kKv) a
// vector's scale needs all of its head's dims, so k and v go to scratch in fp32 and attention
// quantizes and appends them.
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
  static constexpr int kNormedHeads = T::kHeads + T::kKvHeads;  // q and k heads (kQkNorm)
  static constexpr bool kFp8Kv = T::kKv == KvFormat::kFp8;
  Consumer<T>& c;
  int layer;
  int pos[2] = {0, 0};  // warp 0 (the epilogue's warp): positions of this lane's batch columns 2t, 2t+1
  float cs[2], sn[2];   // their RoPE cos/sin at the row block's frequency, loaded by prefetch
  // (as loaded: prefetch uses none of its loads, gemv.cuh)
  bf16_t bias[2];    // kQkvBias: the biases of rows g and g+8 (dims i and i + D/2)
  bf16_t norm_w[2];  // kQkNorm: the q or k norm's weights of dims i and i + D/2 (a head past them: unread)
  __device__ QkvEpilogue(Consumer<T>& c_, const Task& task) : c(c_), layer(task.layer) {
    if (c.warp != 0) return;
#pragma unroll
    for (int q = 0; q < 2; ++q)
      if (2 * (c.lane % 4) + q < c.p.batch) pos[q] = c.shape->positions[2 * (c.lane % 4) + q];
  }
  __device__ static int freq(int rb, int g) { return 8 * ((rb * kRowBlock % D) / kRowBlock) + g; }  // < D/2

  __device__ void prefetch(int rb) {
    const int i = freq(rb, c.lane / 4), head = rb * kRowBlock / D;
#pragma unroll
    for (int q = 0; q < 2; ++q)
      cs[q] = c.p.rope_cos[int64_t(pos[q]) * (D / 2) + i], sn[q] = c.p.rope_sin[int64_t(pos[q]) * (D / 2) + i];
    const LayerWeights& w = c.p.layers[layer];
    if constexpr (T::kQkvBias) {  // rows in the checkpoint's order: head by head, dims in order
      const bf16_t* b = w.qkv_bias + head * D + i;
      bias[0] = b[0], bias[1] = b[D / 2];
    }
    if constexpr (T::kQkNorm)
      if (head < kNormedHeads) {
        const bf16_t* nw = (head < T::kHeads ? w.q_norm : w.k_norm) + i;
        norm_w[0] = nw[0], norm_w[1] = nw[D / 2];
      }
  }

  __device__ void row_block(int rb, const AccTile& acc) {
    const MegakernelParams& p = c.p;
    const int g = c.lane / 4, t = c.lane % 4;
    const int head = rb * kRowBlock / D;  // among q heads, then k, then v
    const int i = freq(rb, g);            // RoPE frequency index
    // q is pre-scaled so attention can use exp2: softmax(s) = exp2(s * log2(e)) / ...
    const float q_scale = 1.4426950408889634f * rsqrtf(float(D));
    float sq[2] = {0.f, 0.f};  // kQkNorm: this lane's share of the row block's sum of squares
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int n = 2 * t + q;
      if (n >= p.batch) continue;
      float lo = acc[q], hi = acc[2 + q];  // dims i and i + D/2
      if constexpr (T::kQkvBias) lo += __bfloat162float(bias[0]), hi += __bfloat162float(bias[1]);
      if (T::kQkNorm && head < kNormedHeads) {
        // RMSNorm then RoPE = its scale (a scalar per head, applied by attention) times RoPE of
        // the weighted rows: the rotation is linear, so the scale can come last.
        sq[q] = lo * lo + hi * hi;
        lo *= __bfloat162float(norm_w[0]), hi *= __bfloat162float(norm_w[1]);
      }
      const float rlo = lo * cs[q] - hi * sn[q], rhi = hi * cs[q] + lo * sn[q];
      if (head < T::kHeads) {
        float* qn = p.scratch.q + (int64_t(n) * T::kHeads + head) * D;
        qn[i] = rlo * q_scale;
        qn[i + D / 2] = rhi * q_scale;
      } else if (head < kNormedHeads) {
        if constexpr (T::kQkNorm || kFp8Kv) {  // attention norms and/or quantizes it into the cache
          float* k = p.scratch.k_new + (int64_t(n) * T::kKvHeads + head - T::kHeads) * D;
          k[i] = rlo;
          k[i + D / 2] = rhi;
        } else {
          bf16_t* k = p.kv_cache + kv_index<T>(p, layer, 0, n, head - T::kHeads, pos[q]);
          k[i] = __float2bfloat16(rlo);
          k[i + D / 2] = __float2bfloat16(rhi);
        }
      } else if constexpr (kFp8Kv) {  // attention quantizes it into the cache
        float* v = p.scratch.k_new + (int64_t(kMaxBatch + n) * T::kKvHeads + head - kNormedHeads) * D;
        v[i] = lo;
        v[i + D / 2] = hi;
      } else {
        bf16_t* v = p.kv_cache + kv_index<T>(p, layer, 1, n, head - kNormedHeads, pos[q]);
        v[i] = __float2bfloat16(lo);
        v[i + D / 2] = __float2bfloat16(hi);
      }
    }
    if constexpr (T::kQkNorm)
      if (head < kNormedHeads) {  // (uniform over the warp: every lane shuffles)
#pragma unroll
        for (int q = 0; q < 2; ++q)
#pragma unroll
          for (int off = 4; off < kWarpSize; off *= 2) sq[q] += __shfl_xor_sync(0xffffffffu, sq[q], off);
        if (g == 0)
#pragma unroll
          for (int q = 0; q < 2; ++q)
            if (2 * t + q < p.batch) head_sq_of<T>(p, 2 * t + q, head)[rb % (D / kRowBlock)] = sq[q];
      }
  }
  __device__ void finish() {}
};

#endif

struct QkvOp : OpDefaults {
  static constexpr const char* kName = "qkv";
  static constexpr int units(const ModelDims& d, int) { return d.qkv_rows() / kRowBlock; }
  static constexpr int64_t unit_bytes(const ModelDims& d, const WeightFormats& f) { return row_block_bytes(d.hidden, f.layers); }

#ifdef __CUDACC__
  template <class T>
  __device__ static bool produce(Producer<T>& pr, Task task, int u0, int u1) {
    return stream_row_blocks<T::kWeights>(pr, pr.p.layers[task.layer].qkv, T::kHidden, u0, u1);
  }
  // x was last written by the task before (the previous layer's down projection, or the embedding)
  template <class T>
  __device__ static bool consume(Consumer<T>& c, Task task, int u0, int u1) {
    const LayerWeights& w = c.p.layers[task.layer];
    return norm_then_matmul<T, T::kWeights, QkvEpilogue<T>>(c, w.attn_norm, 2 * task.layer, w.qkv, task, u0, u1);
  }
#endif
};

}  // namespace flashformer
