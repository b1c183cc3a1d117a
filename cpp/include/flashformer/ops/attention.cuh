// Split-KV flash-decoding attention. Units are (kv head, sequence chunk) pairs; the number of
// chunks follows this step's longest context and batch. The past positions' K and V do not
// depend on this step, so the producer streams them through the weight ring (KV stages) before
// the qkv op is done; only the current position's K and V, and q, are read after the wait.
// Inside a unit the batch rows run on separate warps. With one chunk, its unit writes the O
// projection's B fragments and signals the op itself; with more, each unit writes partial
// (o, m, l) for the q heads of its group and every batch row, and the last unit of a kv head to
// finish merges them and signals. Scores use exp2 (q is pre-scaled by log2 e).
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
  static constexpr int kPartStride = attn_part_stride(D);  // o[D], m, l, pad
  // A KV stage holds the keys of kStagePositions positions of one batch row, then (from the
  // stage's middle) their values.
  static constexpr int kStagePositions = kStageBytes / 2 / (D * 2);

  // Where the past positions of rows [b0, b0 + rows) end in the chunk ending at c1, into `ends`
  // (shared memory): before each row's current position, whose K and V the qkv op writes this
  // step (read directly, after the wait). Read from global memory once per pass, not per stage:
  // under the full weight stream a global load is an L2 round trip.
  __device__ static void row_ends(const MegakernelParams& p, int b0, int rows, int c1, int* ends, int tid, int threads) {
    for (int r = tid; r < rows; r += threads) ends[r] = min(c1, int(p.positions[b0 + r]));
  }
  __device__ static int stages_of(int c0, int end) { return end > c0 ? (end - c0 + kStagePositions - 1) / kStagePositions : 0; }

  // The KV stages of a pass over `rows` rows of the chunk starting at c0, in ring order: round i
  // holds stage i of every row that has one, so the rows' warps work side by side. Calls fn(row
  // r, first position, positions) for each; stops early (false) when fn returns false.
  template <class Fn>
  __device__ static bool for_each_kv_stage(const int* ends, int c0, int rows, Fn&& fn) {
    int rounds = 0;
    for (int r = 0; r < rows; ++r) rounds = max(rounds, stages_of(c0, ends[r]));
    for (int i = 0; i < rounds; ++i)
      for (int r = 0; r < rows; ++r) {
        const int pos = c0 + i * kStagePositions, end = ends[r];
        if (pos < end && !fn(r, pos, min(kStagePositions, end - pos))) return false;
      }
    return true;
  }

  // Rows in passes of up to kConsumerWarps (`per_row` warps on each row at once).
  struct RowPass {
    int rows, per_row;
  };
  __device__ static RowPass row_pass(const MegakernelParams& p, int b0) {
    const int rows = min(p.batch - b0, kConsumerWarps);
    return {rows, kConsumerWarps / rows};
  }

  // Past K and V never depend on this step: the producer streams them through the ring ahead of
  // the qkv wait, in the order consume() takes them.
  __device__ static bool produce(Producer<T>& pr, int layer, int u0, int u1) {
    const MegakernelParams& p = pr.p;
    if (p.timing_variant & kSkipAttention) return true;
    const int chunks = p.attn_chunks;
    const auto [context, active, chunk_len] = chunking(p);
    for (int unit = u0; unit < u1; ++unit) {
      const int kv_head = unit / chunks, chunk = unit % chunks;
      const int c0 = chunk * chunk_len, c1 = min(c0 + chunk_len, context);
      for (int b0 = 0; b0 < p.batch && chunk < active; b0 += kConsumerWarps) {
        const int rows = row_pass(p, b0).rows;
        row_ends(p, b0, rows, c1, pr.kv_ends, 0, 1);
        const bool ok = for_each_kv_stage(pr.kv_ends, c0, rows, [&](int r, int pos, int n) {
          const int64_t k = kv_index<T>(p, layer, 0, b0 + r, kv_head, pos), v = kv_index<T>(p, layer, 1, b0 + r, kv_head, pos);
          return pr.stream_kv(p.kv_cache + k, p.kv_cache + v, n * D * 2);
        });
        if (!ok) return false;
      }
    }
    return true;
  }

  // Raw K or V bf16 of one position for this lane: kDimsPerLane values in one 4- or 8-byte load.
  using RawRow = std::conditional_t<kDimsPerLane == 4, uint2, unsigned>;
  __device__ static void unpack(const RawRow& r, float (&out)[kDimsPerLane]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < kDimsPerLane / 2; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      out[2 * i] = f.x, out[2 * i + 1] = f.y;
    }
  }

  // exp2 as the one MUFU instruction (inputs are <= 0 here; tiny results flush to zero).
  __device__ static float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }

  // q heads rounded up to a power of two: the score reduction below halves them across lanes.
  static constexpr int kHeadSlots = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
  static_assert(G <= kHeadSlots && kHeadSlots <= 8, "the score reduction spreads at most 8 q heads over a warp");

  // The lowest lane holding head h's score after WarpState::add's reduction: round by round
  // (off = 16, 8, ...), bit `off` of a lane picks the upper half of the heads it still holds.
  __device__ static int lane_of_head(int h) {
    int lane = 0;
#pragma unroll
    for (int width = kHeadSlots, off = kWarpSize / 2; width > 1; width /= 2, off /= 2)
      if (h % width >= width / 2) lane += off;
    return lane;
  }

  // One warp's online-softmax state for the G q heads of its kv head and batch row. Each lane
  // holds kDimsPerLane dims of q and o for every head, and the running max m and sum l of the
  // head whose scores it holds (see lane_of_head).
  struct WarpState {
    float q[G][kDimsPerLane], o[G][kDimsPerLane], m, l;

    // Folds N positions in (two interleave their shuffle chains). The G partial dot products of
    // each lane are summed across the warp by halving them round by round (each lane keeps half
    // and sends half), so a position costs about log2(32) + 2G shuffles instead of G * log2(32);
    // each lane ends with the scores of one head, updates that head's m and l, and broadcasts
    // its weights.
    template <int N>
    __device__ void add(const RawRow (&key)[N], const RawRow (&value)[N], int lane) {
      float part[N][kHeadSlots];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float k[kDimsPerLane];
        unpack(key[j], k);
#pragma unroll
        for (int h = 0; h < kHeadSlots; ++h) {
          part[j][h] = 0.f;
          if (h < G)
#pragma unroll
            for (int i = 0; i < kDimsPerLane; ++i) part[j][h] += q[h][i] * k[i];
        }
      }
      int off = kWarpSize / 2;
#pragma unroll
      for (int width = kHeadSlots; width > 1; width /= 2, off /= 2) {
        const bool upper = lane & off;
#pragma unroll
        for (int j = 0; j < N; ++j)
#pragma unroll
          for (int i = 0; i < width / 2; ++i) {
            const float keep = upper ? part[j][i + width / 2] : part[j][i];
            const float send = upper ? part[j][i] : part[j][i + width / 2];
            part[j][i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
          }
      }
#pragma unroll
      for (; off > 0; off /= 2)
#pragma unroll
        for (int j = 0; j < N; ++j) part[j][0] += __shfl_xor_sync(0xffffffffu, part[j][0], off);
      float m_new = m, w[N];
#pragma unroll
      for (int j = 0; j < N; ++j) m_new = fmaxf(m_new, part[j][0]);
      const float corr = fast_exp2(m - m_new);
      l *= corr, m = m_new;
#pragma unroll
      for (int j = 0; j < N; ++j) w[j] = fast_exp2(part[j][0] - m_new), l += w[j];
      float v[N][kDimsPerLane];
#pragma unroll
      for (int j = 0; j < N; ++j) unpack(value[j], v[j]);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const int src = lane_of_head(h);
        const float ch = __shfl_sync(0xffffffffu, corr, src);
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) o[h][i] *= ch;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float wh = __shfl_sync(0xffffffffu, w[j], src);
#pragma unroll
          for (int i = 0; i < kDimsPerLane; ++i) o[h][i] += wh * v[j][i];
        }
      }
    }

    // Positions first, first + stride, ... below n of a KV stage in shared memory, two at a time.
    __device__ void add_stage(const uint8_t* stage, int n, int first, int stride, int lane) {
      const RawRow* keys = reinterpret_cast<const RawRow*>(stage) + lane;
      const RawRow* values = reinterpret_cast<const RawRow*>(stage + kStageBytes / 2) + lane;
      int u = first;
#pragma unroll 1
      for (; u + stride < n; u += 2 * stride) {
        const RawRow key[2] = {keys[u * kWarpSize], keys[(u + stride) * kWarpSize]};
        const RawRow value[2] = {values[u * kWarpSize], values[(u + stride) * kWarpSize]};
        add(key, value, lane);
      }
      if (u < n) {
        const RawRow key[1] = {keys[u * kWarpSize]}, value[1] = {values[u * kWarpSize]};
        add(key, value, lane);
      }
    }
  };

  // This warp's partial over row (b0 + warp / per_row)'s positions of the chunk [c0, c1), into its
  // scratch slot (o, m, l per q head): every per_row-th position of each KV stage of the row, and
  // the current position (from global memory: written by this step's qkv op) on the row's first
  // warp. Every warp takes and frees every stage of the pass. False when the step was aborted.
  __device__ static bool warp_partial(Consumer<T>& c, int layer, int b0, int rows, int per_row, int kv_head, int c0,
                                      int c1) {
    const MegakernelParams& p = c.p;
    const int r = c.warp / per_row, first = c.warp % per_row, b = b0 + r;
    const bool mine = r < rows;
    WarpState st;
    if (mine) {
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const float* qh = p.scratch.q + (int64_t(b) * T::kHeads + kv_head * G + h) * D + c.lane * kDimsPerLane;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) st.q[h][i] = __ldcg(qh + i), st.o[h][i] = 0.f;
      }
      st.m = -FLT_MAX, st.l = 0.f;
    }
    // The current position (on the row's first warp): its loads go out now, its scores after the stages.
    const int pos = mine ? int(p.positions[b]) : -1;
    const bool current = first == 0 && c0 <= pos && pos < c1;
    RawRow cur_k, cur_v;
    if (current) {
      cur_k = __ldcg(reinterpret_cast<const RawRow*>(p.kv_cache + kv_index<T>(p, layer, 0, b, kv_head, pos)) + c.lane);
      cur_v = __ldcg(reinterpret_cast<const RawRow*>(p.kv_cache + kv_index<T>(p, layer, 1, b, kv_head, pos)) + c.lane);
    }
    const bool ok = for_each_kv_stage(c.kv_ends, c0, rows, [&](int row, int, int n) {
      if (!c.ring.wait_full(c.cursor, p, c.data_wait)) return false;
      if (row == r) st.add_stage(reinterpret_cast<const uint8_t*>(c.ring.stage(c.cursor.stage)), n, first, per_row, c.lane);
      c.ring.release(c.cursor);
      return true;
    });
    if (!ok) return false;
    if (!mine) return true;
    if (current) {
      const RawRow key[1] = {cur_k}, value[1] = {cur_v};
      st.add(key, value, c.lane);
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float* dst = c.attn + (c.warp * G + h) * kPartStride;
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) dst[c.lane * kDimsPerLane + i] = st.o[h][i];
      if (c.lane == lane_of_head(h)) dst[D] = st.m, dst[D + 1] = st.l;
    }
    return true;
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
        const auto [rows, per_row] = row_pass(p, b0);
        row_ends(p, b0, rows, c1, c.kv_ends, c.tid, kConsumerThreads);
        c.sync();  // the ends are visible (the last pass's readers are past its closing barrier)
        if (!warp_partial(c, layer, b0, rows, per_row, kv_head, c0, c1)) return false;
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
          if (chunk == 0) publish(c.counter(layer, kOp), p);
          atomicAdd(group, 1u);
        }
        c.sync();  // every unit ends on a barrier: thread 0 may not run ahead into the next task's flags
        continue;
      }
      if (c.finished_last(group, unsigned(chunks))) {  // the other chunks' partials are visible
        if (!skip) merge_chunks(c, kv_head, active);
        c.sync();  // the merged output is written before the signal
        if (c.tid == 0) publish(c.counter(layer, kOp), p);
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
