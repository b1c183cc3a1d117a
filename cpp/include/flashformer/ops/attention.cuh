// Split-KV flash-decoding attention. Units are (kv head, sequence chunk) pairs; the number of
// chunks follows this step's longest context and batch. Inside a unit the batch rows run on
// separate warps. With one chunk, its unit writes the O projection's B fragments and signals the
// op itself; with more, each unit writes partial (o, m, l) for the q heads of its group and
// every batch row, and the last unit of a kv head to finish merges them and signals. Scores use
// exp2 (q is pre-scaled by log2 e).
#pragma once

#include <cfloat>
#include <type_traits>

#include "flashformer/ops/context.cuh"
#include "flashformer/sync.cuh"
#include "flashformer/weight_layout.cuh"

namespace flashformer {

template <class T>
struct AttentionOp {
  static constexpr Op kOp = Op::kAttention;
  static constexpr int D = T::kHeadDim, G = T::kGroup;
  static constexpr int kDimsPerLane = D / kWarpSize;  // 2 or 4 bf16: one 4- or 8-byte load
  static constexpr int kUnroll = 16 / kDimsPerLane;   // positions per group: 64 B of K+V per lane (two groups in flight)
  static constexpr int kPartStride = attn_part_stride(D);  // o[D], m, l, pad

  __device__ static bool produce(Producer<T>&, int, int, int) { return true; }  // K and V are loaded directly

  // Raw K or V bf16 of one position for this lane: kDimsPerLane values in one 4- or 8-byte load.
  using RawRow = std::conditional_t<kDimsPerLane == 4, uint2, unsigned>;
  __device__ static RawRow load_raw(const bf16_t* src) { return __ldcg(reinterpret_cast<const RawRow*>(src)); }
  __device__ static void unpack(const RawRow& r, float (&out)[kDimsPerLane]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < kDimsPerLane / 2; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      out[2 * i] = f.x, out[2 * i + 1] = f.y;
    }
  }

  // Positions [p0, p1) of batch row b, every `stride`-th group of kUnroll starting at group
  // `first`, into this warp's scratch slot (o, m, l per q head). The next group's K and V are
  // loaded before the current one is computed, so two groups' loads are in flight.
  __device__ static void warp_partial(Consumer<T>& c, int layer, int b, int kv_head, int p0, int p1, int first,
                                      int stride) {
    const MegakernelParams& p = c.p;
    float q[G][kDimsPerLane], o[G][kDimsPerLane], m[G], l[G];
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float* qh = p.scratch.q + (int64_t(b) * T::kHeads + kv_head * G + h) * D + c.lane * kDimsPerLane;
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) q[h][i] = __ldcg(qh + i), o[h][i] = 0.f;
      m[h] = -FLT_MAX, l[h] = 0.f;
    }
    const bf16_t* keys = p.kv_cache + kv_index<T>(p, layer, 0, b, kv_head, 0) + c.lane * kDimsPerLane;
    const bf16_t* values = p.kv_cache + kv_index<T>(p, layer, 1, b, kv_head, 0) + c.lane * kDimsPerLane;
    RawRow next_k[kUnroll], next_v[kUnroll];
    auto load_group = [&](int base) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u < p1) next_k[u] = load_raw(keys + int64_t(base + u) * D), next_v[u] = load_raw(values + int64_t(base + u) * D);
    };
    const int step = stride * kUnroll;
    int base = p0 + first * kUnroll;
    if (base < p1) load_group(base);
    for (; base < p1; base += step) {
      RawRow raw_k[kUnroll], raw_v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw_k[u] = next_k[u], raw_v[u] = next_v[u];
      if (base + step < p1) load_group(base + step);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u >= p1) break;
        float k[kDimsPerLane], v[kDimsPerLane];
        unpack(raw_k[u], k), unpack(raw_v[u], v);
#pragma unroll
        for (int h = 0; h < G; ++h) {
          float s = 0.f;
#pragma unroll
          for (int i = 0; i < kDimsPerLane; ++i) s += q[h][i] * k[i];
#pragma unroll
          for (int off = kWarpSize / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
          const float m_new = fmaxf(m[h], s);
          const float corr = exp2f(m[h] - m_new), w = exp2f(s - m_new);
          l[h] = l[h] * corr + w;
#pragma unroll
          for (int i = 0; i < kDimsPerLane; ++i) o[h][i] = o[h][i] * corr + w * v[i];
          m[h] = m_new;
        }
      }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float* dst = c.attn + (c.warp * G + h) * kPartStride;
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) dst[c.lane * kDimsPerLane + i] = o[h][i];
      if (c.lane == 0) dst[D] = m[h], dst[D + 1] = l[h];
    }
  }

  // The longest context this step (positions are 0-based), the same on every SM.
  __device__ static int context_of(const MegakernelParams& p) {
    int context = 0;
    for (int b = 0; b < p.batch; ++b) context = max(context, int(p.positions[b]) + 1);
    return context;
  }
  // Row-positions per unit below which splitting a context across more SMs costs more (in the
  // cross-SM merge) than it saves: one row's chunk is at least kMinUnitWork / batch positions.
  static constexpr int kMinUnitWork = 256;

  // The longest context, the chunks holding positions this step (at most attn_chunks) and their length.
  struct Chunking {
    int context, active, len;
  };
  __device__ static Chunking chunking(const MegakernelParams& p) {
    const int context = context_of(p), min_chunk = max(kMinUnitWork / p.batch, 16);
    const int active = min(p.attn_chunks, (context + min_chunk - 1) / min_chunk);
    return {context, active, (context + active - 1) / active};
  }

  // Merge weights of partial (m, l) pairs against their maximum; an empty partial has l == 0.
  __device__ static float rescale(float m, float l, float m_max) { return l == 0.f ? 0.f : exp2f(m - m_max); }

  __device__ static bool consume(Consumer<T>& c, int layer, int u0, int u1) {
    const MegakernelParams& p = c.p;
    const int chunks = p.attn_chunks;
    const auto [context, active, chunk_len] = chunking(p);
    for (int unit = u0; unit < u1; ++unit) {
      const int kv_head = unit / chunks, chunk = unit % chunks;
      const int c0 = chunk * chunk_len, c1 = min(c0 + chunk_len, context);
      // Chunks past the active ones have no positions: they only count towards the group.
      const bool skip = p.timing_variant & kSkipAttention;
      // Rows in passes of up to kConsumerWarps, `per_row` warps on each row at once; the warps of
      // a row then merge their partials through shared memory.
      for (int b0 = 0; b0 < p.batch && chunk < active && !skip; b0 += kConsumerWarps) {
        const int rows = min(p.batch - b0, kConsumerWarps), per_row = kConsumerWarps / rows;
        const int r = c.warp / per_row;
        if (r < rows) warp_partial(c, layer, b0 + r, kv_head, c0, min(c1, int(p.positions[b0 + r]) + 1), c.warp % per_row, per_row);
        c.sync();  // every warp's partial is in scratch
        for (int j = c.tid; j < rows * G * D; j += kConsumerThreads) {
          const int row = j / (G * D), h = (j / D) % G, d = j % D, b = b0 + row;
          const float* slots = c.attn + row * per_row * G * kPartStride;
          float m_max = -FLT_MAX, o = 0.f, l = 0.f;
          for (int w = 0; w < per_row; ++w) {
            const float* src = slots + (w * G + h) * kPartStride;
            if (src[D + 1] != 0.f) m_max = fmaxf(m_max, src[D]);
          }
          for (int w = 0; w < per_row; ++w) {
            const float* src = slots + (w * G + h) * kPartStride;
            const float s = rescale(src[D], src[D + 1], m_max);
            o += s * src[d], l += s * src[D + 1];
          }
          if (active == 1) {  // the whole context is in this chunk: the output, no cross-SM merge
            p.scratch.attn_frag[act_fragment_index(b, int64_t(kv_head * G + h) * D + d)] = __float2bfloat16(o / l);
            continue;
          }
          float* part = p.scratch.attn_part + ((int64_t(b) * T::kHeads + kv_head * G + h) * chunks + chunk) * kPartStride;
          part[d] = o;
          if (d == 0) part[D] = m_max, part[D + 1] = l;
        }
        c.sync();  // scratch is free for the next pass
      }
      unsigned* group = p.scratch.counters + p.n_layers * kNumOps + layer * T::kKvHeads + kv_head;
      if (active == 1 && !skip) {
        // Chunk 0 wrote its kv head's output (the pass's barrier ordered the writes): it signals
        // the op at once. Every unit still counts towards the group (its epoch target).
        if (c.tid == 0) {
          if (chunk == 0) publish(c.counter(layer, kOp));
          atomicAdd(group, 1u);
        }
        c.sync();  // every unit ends on a barrier: thread 0 may not run ahead into the next task's flags
        continue;
      }
      if (c.finished_last(group, unsigned(chunks))) {  // the other chunks' partials are visible
        if (!skip) merge_chunks(c, kv_head, active);
        c.sync();  // the merged output is written before the signal
        if (c.tid == 0) publish(c.counter(layer, kOp));
      }
    }
    return true;
  }

  // out = sum_c exp2(m_c - M) o_c / sum_c exp2(m_c - M) l_c over the active chunks, into the O
  // projection's B fragments. First one warp per (row, head) pair finds M and the sum over its
  // chunks (lanes over chunks); then every thread takes 4 dims of a pair and sums their chunks,
  // all of a chunk group's loads in flight.
  __device__ static void merge_chunks(Consumer<T>& c, int kv_head, int active) {
    const MegakernelParams& p = c.p;
    const int chunks = p.attn_chunks, pairs = p.batch * G;
    auto part_of = [&](int pair, int chunk) {  // pair = b * G + h
      const int b = pair / G, head = kv_head * G + pair % G;
      return p.scratch.attn_part + ((int64_t(b) * T::kHeads + head) * chunks + chunk) * kPartStride;
    };
    float* stats = c.attn;  // [pairs][2]: M, 1 / sum; the partial slots are free by now
    for (int pair = c.warp; pair < pairs; pair += kConsumerWarps) {
      float m_run = -FLT_MAX, l_run = 0.f;
      for (int ch = c.lane; ch < active; ch += kWarpSize) {
        const float* pc = part_of(pair, ch);
        const float m = __ldcg(pc + D), l = __ldcg(pc + D + 1);
        if (l == 0.f) continue;  // a chunk past this row's context
        const float m_new = fmaxf(m_run, m);
        l_run = l_run * exp2f(m_run - m_new) + l * exp2f(m - m_new), m_run = m_new;
      }
#pragma unroll
      for (int off = kWarpSize / 2; off > 0; off /= 2) {
        const float m_o = __shfl_xor_sync(0xffffffffu, m_run, off), l_o = __shfl_xor_sync(0xffffffffu, l_run, off);
        const float m_new = fmaxf(m_run, m_o);
        l_run = rescale(m_run, l_run, m_new) * l_run + rescale(m_o, l_o, m_new) * l_o, m_run = m_new;
      }
      if (c.lane == 0) stats[2 * pair] = m_run, stats[2 * pair + 1] = 1.f / l_run;
    }
    c.sync();  // stats visible
    constexpr int kQuads = D / 4;
    for (int j = c.tid; j < pairs * kQuads; j += kConsumerThreads) {
      const int pair = j / kQuads, d = 4 * (j % kQuads);
      const float m_max = stats[2 * pair];
      float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
      for (int ch = 0; ch < active; ++ch) {
        const float* pc = part_of(pair, ch);
        const float w = exp2f(__ldcg(pc + D) - m_max);  // 0 for an empty chunk (m = -FLT_MAX, o = 0)
        const float4 oc = __ldcg(reinterpret_cast<const float4*>(pc + d));
        o.x += w * oc.x, o.y += w * oc.y, o.z += w * oc.z, o.w += w * oc.w;
      }
      const float inv = stats[2 * pair + 1];
      const int64_t k = int64_t(kv_head * G + pair % G) * D + d;  // dims d..d+3: two adjacent pairs
      bf16_t* out = p.scratch.attn_frag;
      *reinterpret_cast<__nv_bfloat162*>(out + act_fragment_index(pair / G, k)) = __floats2bfloat162_rn(o.x * inv, o.y * inv);
      *reinterpret_cast<__nv_bfloat162*>(out + act_fragment_index(pair / G, k + 2)) = __floats2bfloat162_rn(o.z * inv, o.w * inv);
    }
  }
};

}  // namespace flashformer
