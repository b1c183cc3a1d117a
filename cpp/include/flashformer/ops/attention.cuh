// Split-KV flash-decoding attention. Units are (kv head, sequence chunk) pairs; the number of
// chunks follows this step's longest context and batch. The past positions' K and V do not
// depend on this step, so the producer streams them through the weight ring (KV stages) before
// the qkv op is done; only the current position's K and V, and q, are read after the wait. With
// q/k norm (kQkNorm) this op applies the heads' RMSNorm scales to q and to the current k, and
// appends that k to the KV cache (qkv.cuh).
// Inside a unit the batch rows run on separate warps. With one chunk, its unit writes the O
// projection's B fragments; with more, each unit writes partial (o, m, l) for the q heads of its
// group and every batch row, and once a kv head's partials are all in, its units merge them, each
// its share of the (row, q head) pairs. Every CTA with units then signals the op (kEveryCta).
// Scores use exp2 (q is pre-scaled by log2 e).
// An FP8 KV cache (T::kKv, with p.kv_scale) holds e4m3 vectors, each with an fp32
// scale: a stage carries the positions' key bytes and after them their scales (copied from the
// 16-byte boundary below the first), then the same for the values from the stage's middle. Keys
// turn into f16 (one cvt a pair) for an f16 score mma with q in f16, each score times its key's
// scale; values into fp32 times theirs. The current position's k and v come from scratch in fp32
// (qkv.cuh): the warp that takes it quantizes them per vector (absmax / 448,
// as the reference path's quantize_kv) and appends them, bytes and scales, to the cache.
#pragma once

#include <algorithm>

#include "flashformer/kernel_config.hpp"
#include "flashformer/op.hpp"
#ifdef __CUDACC__
#include <cuda_fp8.h>

#include <cfloat>
#include <type_traits>

#include "flashformer/context.cuh"
#include "flashformer/rmsnorm.cuh"
#include "flashformer/sync.cuh"
#include "flashformer/weight_layout.cuh"
#endif

namespace flashformer {

#ifdef __CUDACC__
// The attention op's device code for config T (AttentionOp below forwards its roles here).
template <class T>
struct AttentionKernel {
  static constexpr int D = T::kHeadDim, G = T::kGroup;
  static constexpr bool kFp8Kv = T::kKv == KvFormat::kFp8;  // an e4m3 cache with scales
  static constexpr float kE4m3Max = 448.f;  // the largest finite e4m3 (torch.finfo(torch.float8_e4m3fn).max)
  // The score mma's operands: bf16, or f16 beside e4m3 keys (their exact f16 values).
  static constexpr WeightFormat kScoreFormat = kFp8Kv ? WeightFormat::kFp8 : WeightFormat::kBf16;
  static constexpr int kDimsPerLane = D / kWarpSize;  // 2 or 4 bf16: one 4- or 8-byte load
  static constexpr int kPartStride = attn_part_stride(D);  // o[D], m, l, pad
  // A KV stage holds the keys of kStagePositions positions of one batch row, then (from the
  // stage's middle) their values; FP8, each half's rows followed by their scales (kScaleOffset
  // bytes into the half), up to 1.75x bf16's positions (kernel_config.hpp).
  static constexpr int kStagePositions = attn_stage_positions(T::kDims, T::kKv);
  static constexpr int kScaleOffset = attn_fp8_scale_offset(D, kStagePositions);
  static constexpr int kWarpFloats = attn_warp_floats(T::kDims);  // a consumer warp's slot (kernel_config.hpp)

  // Where the past positions of rows [b0, b0 + rows) end in the chunk ending at c1, into `ends`
  // (shared memory): before each row's current position, whose K and V the qkv op writes this
  // step (read directly, after the wait). Once per pass, not per stage.
  __device__ static void row_ends(const StepShape& s, int b0, int rows, int c1, int* ends, int tid, int threads) {
    for (int r = tid; r < rows; r += threads) ends[r] = min(c1, s.positions[b0 + r]);
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

  // FP8: the scales of n positions from KV element `index` on, as a stage holds them: copied from
  // the 16-byte boundary at or below the first (`offset` scales before it), a multiple of 16 bytes.
  struct ScaleSpan {
    int64_t first;  // index in p.kv_scale of the first scale copied
    int offset, bytes;
  };
  __device__ static ScaleSpan scale_span(int64_t index, int n) {
    const int64_t at = index / D, first = at & ~int64_t(3);
    const int offset = int(at - first);
    return {first, offset, (offset + n + 3) / 4 * 16};  // (at most attn_fp8_scale_bytes(n))
  }

  // Past K and V never depend on this step: the producer streams them through the ring ahead of
  // the qkv wait, in the order consume() takes them.
  __device__ static bool produce(Producer<T>& pr, int layer, int u0, int u1) {
    const MegakernelParams& p = pr.p;
    if (variant_on<T>(p, kSkipAttention)) return true;
    const int chunks = p.attn_chunks;
    const StepShape& s = *pr.shape;
    for (int unit = u0; unit < u1; ++unit) {
      const int kv_head = unit / chunks, chunk = unit % chunks;
      const int c0 = chunk * s.chunk_len, c1 = min(c0 + s.chunk_len, s.context);
      for (int b0 = 0; b0 < p.batch && chunk < s.active_chunks; b0 += kConsumerWarps) {
        const int rows = row_pass(p, b0).rows;
        row_ends(s, b0, rows, c1, pr.kv_ends, 0, 1);
        const bool ok = for_each_kv_stage(pr.kv_ends, c0, rows, [&](int r, int pos, int n) {
          const int64_t k = kv_index<T>(p, layer, 0, b0 + r, kv_head, pos), v = kv_index<T>(p, layer, 1, b0 + r, kv_head, pos);
          if constexpr (kFp8Kv) {
            const uint8_t* bytes = reinterpret_cast<const uint8_t*>(p.kv_cache);
            const ScaleSpan ks = scale_span(k, n), vs = scale_span(v, n);
            return pr.stream_kv_fp8(bytes + k, bytes + v, p.kv_scale + ks.first, ks.bytes, p.kv_scale + vs.first,
                                    vs.bytes, n * D, kScaleOffset);
          } else {
            return pr.stream_kv(p.kv_cache + k, p.kv_cache + v, n * D * 2);
          }
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

  // FP8: this lane's kDimsPerLane e4m3 bytes of a value row, times the row's scale.
  __device__ static void unpack_fp8(const uint8_t* row, float scale, float (&out)[kDimsPerLane]) {
    uint32_t w;
    if constexpr (kDimsPerLane == 4) {
      w = *reinterpret_cast<const uint32_t*>(row);
    } else {
      w = *reinterpret_cast<const uint16_t*>(row);
    }
    const uint32_t h[2] = {e4m3x2_to_f16x2<false>(w), e4m3x2_to_f16x2<true>(w)};
#pragma unroll
    for (int i = 0; i < kDimsPerLane / 2; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h[i]));
      out[2 * i] = f.x * scale, out[2 * i + 1] = f.y * scale;
    }
  }

  // exp2 as the one MUFU instruction (inputs are <= 0 here; tiny results flush to zero).
  __device__ static float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }

  // q heads rounded up to a power of two: the stride of the weights in the scoring scratch.
  static constexpr int kHeadSlots = attn_head_slots(G);
  // Scores run on the tensor cores (mma.m16n8k16): rows are the G q heads (of 16), columns 8
  // positions (one tile), the reduction the head dims, in chunks of 32 (two k-steps).
  static constexpr int kChunks = D / 32;
  static_assert(G <= 8 && D % 32 == 0, "scores map the q heads onto the mma's rows, head_dim onto 32-dim chunks");
  // A warp's scoring scratch is its slot (the partials are written only after its last stage):
  // the stage's rescale factors (kHeadSlots floats), then its weights [kStagePositions][kHeadSlots];
  // for the current position, its K and V rows from kCurrentRows floats on.
  static constexpr int kCurrentRows = 2 * kHeadSlots < 8 ? 8 : 2 * kHeadSlots;
  static_assert(kHeadSlots * (1 + kStagePositions) <= kWarpFloats && kCurrentRows + D <= kWarpFloats &&
                    G * kPartStride <= kWarpFloats,
                "the scoring scratch and the partials fit in the warp's slot");

  // n positions' K and V rows in shared memory: bf16, or (kFp8Kv) e4m3 bytes with one scale per
  // position (key_scales[u], value_scales[u]).
  struct KvRows {
    const void* keys;
    const void* values;
    const float* key_scales = nullptr;
    const float* value_scales = nullptr;
  };

  // One warp's online-softmax state for the G q heads of its kv head and batch row.
  struct WarpState {
    // q as bf16 (kFp8Kv: f16) A fragments of the score mma, rows g < G (the rest zero): lane t's k indices of
    // chunk ch's two k-steps are dims 32 ch + 8 t .. + 7 (the same permutation as the keys' B
    // fragments, one 16-byte load each).
    uint32_t qa[kChunks][4];
    float o[G][kDimsPerLane];  // every head's o at dims lane * kDimsPerLane.. (CUDA cores)
    float m, l;                // head lane / 4: its running max, and this lane's share of the sum

    // q_heads: the G heads of this kv head, [G][D] fp32; scale: head lane / 4's factor (its
    // RMSNorm scale with q/k norm, else 1).
    __device__ void start(const float* q_heads, float scale, int lane) {
      const int g = lane / 4, t = lane % 4;
#pragma unroll
      for (int ch = 0; ch < kChunks; ++ch) {
        float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
        if (g < G) {
          const float4* src = reinterpret_cast<const float4*>(q_heads + g * D + 32 * ch + 8 * t);
          lo = __ldcg(src), hi = __ldcg(src + 1);
        }
        qa[ch][0] = pack(scale * lo.x, scale * lo.y), qa[ch][1] = pack(scale * lo.z, scale * lo.w);
        qa[ch][2] = pack(scale * hi.x, scale * hi.y), qa[ch][3] = pack(scale * hi.z, scale * hi.w);
      }
#pragma unroll
      for (int h = 0; h < G; ++h)
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) o[h][i] = 0.f;
      m = -INFINITY, l = 0.f;
    }
    __device__ static uint32_t pack(float a, float b) {
      if constexpr (kFp8Kv) {
        const __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<const uint32_t*>(&h);
      } else {
        const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<const uint32_t*>(&h);
      }
    }

    // Folds positions [0, n) (1 <= n <= kStagePositions) of the K and V rows `kv` (shared memory,
    // D elements a row) in. Scores: one mma per tile and k-step, lane (g, t) ends with head g's
    // scores of positions 2t, 2t+1 of each tile; their weights go through `scratch` to every
    // lane, which accumulates o for its dims on the CUDA cores.
    __device__ void add(const KvRows& kv, int n, float* scratch, int lane) {
      const int g = lane / 4, t = lane % 4;
      // Raw scores into the weights' places first (each lane reads back only its own), so no
      // tile's scores stay live in registers.
      float* weights = scratch + kHeadSlots;
      float mx = -INFINITY;
#pragma unroll 2
      for (int j = 0; 8 * j < n; ++j) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        const int key = min(8 * j + g, n - 1);  // past n: a valid row
#pragma unroll
        for (int ch = 0; ch < kChunks; ++ch) {
          uint2 lo, hi;  // the B registers of the chunk's two k-steps: dims 32 ch + 8 t .. +3, then .. +7
          if constexpr (kFp8Kv) {
            const uint2 k = reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(kv.keys) + key * D)[4 * ch + t];
            lo = make_uint2(e4m3x2_to_f16x2<false>(k.x), e4m3x2_to_f16x2<true>(k.x));
            hi = make_uint2(e4m3x2_to_f16x2<false>(k.y), e4m3x2_to_f16x2<true>(k.y));
          } else {
            const uint4 k = reinterpret_cast<const uint4*>(static_cast<const bf16_t*>(kv.keys) + key * D)[4 * ch + t];
            lo = make_uint2(k.x, k.y), hi = make_uint2(k.z, k.w);
          }
          mma_fragment<kScoreFormat>(acc, make_uint4(qa[ch][0], 0u, qa[ch][1], 0u), lo);
          mma_fragment<kScoreFormat>(acc, make_uint4(qa[ch][2], 0u, qa[ch][3], 0u), hi);
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int u = 8 * j + 2 * t + e;
          if (u < n) {
            const float score = kFp8Kv ? acc[e] * kv.key_scales[u] : acc[e];
            mx = fmaxf(mx, score);
            if (g < G) weights[u * kHeadSlots + g] = score;
          }
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));  // finite: lane t = 0 holds position 0
      const float m_new = fmaxf(m, mx), corr = fast_exp2(m - m_new);
      float sum = 0.f;
      if (g < G)
#pragma unroll 1
        for (int u = 2 * t; u < n; u += 8)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (u + e < n) {
              float& w = weights[(u + e) * kHeadSlots + g];
              w = fast_exp2(w - m_new);
              sum += w;
            }
      l = l * corr + sum, m = m_new;
      if (t == 0 && g < G) scratch[g] = corr;
      __syncwarp();  // the weights and factors are visible to the warp
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const float ch = scratch[h];
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) o[h][i] *= ch;
      }
#pragma unroll 4
      for (int u = 0; u < n; ++u) {
        float v[kDimsPerLane], w[kHeadSlots];
        if constexpr (kFp8Kv) {
          unpack_fp8(static_cast<const uint8_t*>(kv.values) + u * D + lane * kDimsPerLane, kv.value_scales[u], v);
        } else {
          unpack(reinterpret_cast<const RawRow*>(kv.values)[u * kWarpSize + lane], v);
        }
        load_weights(weights + u * kHeadSlots, w);
#pragma unroll
        for (int h = 0; h < G; ++h)
#pragma unroll
          for (int i = 0; i < kDimsPerLane; ++i) o[h][i] += w[h] * v[i];
      }
      __syncwarp();  // the scratch is read before the next call writes it
    }
    __device__ static void load_weights(const float* src, float (&w)[kHeadSlots]) {
      if constexpr (kHeadSlots == 4) {
        const float4 v = *reinterpret_cast<const float4*>(src);
        w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
      } else {
#pragma unroll
        for (int h = 0; h < kHeadSlots; ++h) w[h] = src[h];
      }
    }

    // The partial (o, m, l) of every head into `slots` ([G][kPartStride]).
    __device__ void write(float* slots, int lane) const {
      const int g = lane / 4, t = lane % 4;
      float l_sum = l + __shfl_xor_sync(0xffffffffu, l, 1);
      l_sum += __shfl_xor_sync(0xffffffffu, l_sum, 2);
#pragma unroll
      for (int h = 0; h < G; ++h)
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) slots[h * kPartStride + lane * kDimsPerLane + i] = o[h][i];
      if (t == 0 && g < G) slots[g * kPartStride + D] = m, slots[g * kPartStride + D + 1] = l_sum;
    }
  };

  // This lane's dims of the current position's key (row b, kv head `kv_head`). With q/k norm the
  // qkv op left it in scratch without its head's RMSNorm scale: scaled here, it is also appended
  // to the KV cache (by the one warp that takes the current position of this row and kv head).
  __device__ static RawRow current_key(const MegakernelParams& p, int layer, int b, int kv_head, int pos, int lane) {
    RawRow* cached = reinterpret_cast<RawRow*>(p.kv_cache + kv_index<T>(p, layer, 0, b, kv_head, pos)) + lane;
    if constexpr (!T::kQkNorm) {
      return __ldcg(cached);
    } else {
      const float scale = head_rms_scale<T>(p, b, T::kHeads + kv_head);
      const float* k = p.scratch.k_new + (int64_t(b) * T::kKvHeads + kv_head) * D + lane * kDimsPerLane;
      RawRow out;
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
      for (int i = 0; i < kDimsPerLane / 2; ++i) h[i] = __floats2bfloat162_rn(scale * __ldcg(k + 2 * i), scale * __ldcg(k + 2 * i + 1));
      *cached = out;
      return out;
    }
  }

  // FP8: the current position's k or v (kv 0 or 1; row b, kv head `kv_head`) from scratch in fp32,
  // times `factor` (k's RMSNorm scale with q/k norm) and rounded to bf16 as a bf16 cache would
  // hold it, quantized as one vector (scale = absmax / 448, each value / scale to the nearest
  // e4m3) and appended to the cache. Returns this lane's e4m3 bytes (kDimsPerLane of them, low
  // first) and, through `scale`, the vector's scale.
  __device__ static uint32_t append_fp8(const MegakernelParams& p, int layer, int kv, int b, int kv_head, int pos,
                                        float factor, float& scale, int lane) {
    const float* src = p.scratch.k_new + (int64_t(kv * kMaxBatch + b) * T::kKvHeads + kv_head) * D + lane * kDimsPerLane;
    float x[kDimsPerLane], amax = 0.f;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      x[i] = __bfloat162float(__float2bfloat16(factor * __ldcg(src + i)));
      amax = fmaxf(amax, fabsf(x[i]));
    }
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    scale = amax > 0.f ? __fdiv_rn(amax, kE4m3Max) : 1.f;
    uint32_t bytes = 0;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const float q = fminf(fmaxf(__fdiv_rn(x[i], scale), -kE4m3Max), kE4m3Max);
      bytes |= uint32_t(__nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3)) << (8 * i);
    }
    const int64_t at = kv_index<T>(p, layer, kv, b, kv_head, pos);
    uint8_t* dst = reinterpret_cast<uint8_t*>(p.kv_cache) + at + lane * kDimsPerLane;
    if constexpr (kDimsPerLane == 4) {
      *reinterpret_cast<uint32_t*>(dst) = bytes;
    } else {
      *reinterpret_cast<uint16_t*>(dst) = uint16_t(bytes);
    }
    if (lane == 0) p.kv_scale[at / D] = scale;
    return bytes;
  }

  // This warp's partial over row (b0 + warp / per_row)'s positions of the chunk [c0, c1), into its
  // slot (o, m, l per q head): the row's KV stages go round-robin to its per_row warps, and the
  // current position (from global memory: written by this step's qkv op) to the next warp in
  // that order. Every warp takes and frees every stage of the pass. False when the step was
  // aborted.
  __device__ static bool warp_partial(Consumer<T>& c, int layer, int b0, int rows, int per_row, int kv_head, int c0,
                                      int c1) {
    const MegakernelParams& p = c.p;
    const int r = c.warp / per_row, first = c.warp % per_row, b = b0 + r;
    const bool mine = r < rows;
    float* slots = c.attn + c.warp * kWarpFloats;  // also the scoring scratch until the end
    // The current position: its loads go out now (FP8: it is quantized and appended first, before
    // the warp's state is live), its scores after the stages.
    const int pos = mine ? c.shape->positions[b] : -1;
    const bool current = c0 <= pos && pos < c1 && stages_of(c0, mine ? c.kv_ends[r] : 0) % per_row == first;
    RawRow cur_k, cur_v;    // bf16
    uint32_t cur_k8, cur_v8;  // FP8: this lane's bytes, and the vectors' scales
    float cur_ks, cur_vs;
    if (current) {
      if constexpr (kFp8Kv) {
        const float factor = T::kQkNorm ? head_rms_scale<T>(p, b, T::kHeads + kv_head) : 1.f;
        cur_k8 = append_fp8(p, layer, 0, b, kv_head, pos, factor, cur_ks, c.lane);
        cur_v8 = append_fp8(p, layer, 1, b, kv_head, pos, 1.f, cur_vs, c.lane);
      } else {
        cur_k = current_key(p, layer, b, kv_head, pos, c.lane);
        cur_v = __ldcg(reinterpret_cast<const RawRow*>(p.kv_cache + kv_index<T>(p, layer, 1, b, kv_head, pos)) + c.lane);
      }
    }
    WarpState st;
    if (mine) {
      const int head = kv_head * G + min(c.lane / 4, G - 1);  // (lanes past the G heads load nothing)
      st.start(p.scratch.q + (int64_t(b) * T::kHeads + kv_head * G) * D, T::kQkNorm ? head_rms_scale<T>(p, b, head) : 1.f,
               c.lane);
    }
    const bool ok = for_each_kv_stage(c.kv_ends, c0, rows, [&](int row, int at, int n) {
      if (!c.ring.wait_full(c.cursor, p, c.data_wait)) return false;
      if (row == r && (at - c0) / kStagePositions % per_row == first) {
        const uint8_t* stage = reinterpret_cast<const uint8_t*>(c.ring.stage(c.cursor.stage));
        KvRows kv{stage, stage + kStageBytes / 2};  // values from the stage's middle
        if constexpr (kFp8Kv) {  // each half's scales after its rows, from their 16-byte boundary
          kv.key_scales = reinterpret_cast<const float*>(stage + kScaleOffset) +
                          scale_span(kv_index<T>(p, layer, 0, b, kv_head, at), n).offset;
          kv.value_scales = reinterpret_cast<const float*>(stage + kStageBytes / 2 + kScaleOffset) +
                            scale_span(kv_index<T>(p, layer, 1, b, kv_head, at), n).offset;
        }
        st.add(kv, n, slots, c.lane);
      }
      c.ring.release(c.cursor);
      return true;
    });
    if (!ok) return false;
    if (!mine) return true;
    if (current) {
      if constexpr (kFp8Kv) {  // K row, V row (D bytes each), their two scales
        uint8_t* rows_kv = reinterpret_cast<uint8_t*>(slots + kCurrentRows);
        float* scales = reinterpret_cast<float*>(rows_kv + 2 * D);
        if constexpr (kDimsPerLane == 4) {
          reinterpret_cast<uint32_t*>(rows_kv)[c.lane] = cur_k8, reinterpret_cast<uint32_t*>(rows_kv + D)[c.lane] = cur_v8;
        } else {
          reinterpret_cast<uint16_t*>(rows_kv)[c.lane] = uint16_t(cur_k8);
          reinterpret_cast<uint16_t*>(rows_kv + D)[c.lane] = uint16_t(cur_v8);
        }
        if (c.lane == 0) scales[0] = cur_ks, scales[1] = cur_vs;
        __syncwarp();
        st.add(KvRows{rows_kv, rows_kv + D, scales, scales + 1}, 1, slots, c.lane);
      } else {
        RawRow* rows_kv = reinterpret_cast<RawRow*>(slots + kCurrentRows);  // K row, then V row
        rows_kv[c.lane] = cur_k, rows_kv[kWarpSize + c.lane] = cur_v;
        __syncwarp();
        const bf16_t* keys = reinterpret_cast<const bf16_t*>(rows_kv);
        st.add(KvRows{keys, keys + D}, 1, slots, c.lane);
      }
    }
    st.write(slots, c.lane);
    return true;
  }

  // Merge weights of partial (m, l) pairs against their maximum; an empty partial has l == 0.
  __device__ static float rescale(float m, float l, float m_max) { return l == 0.f ? 0.f : exp2f(m - m_max); }

  __device__ static bool consume(Consumer<T>& c, Task task, int u0, int u1) {
    const int layer = task.layer;
    const MegakernelParams& p = c.p;
    const int chunks = p.attn_chunks;
    const StepShape& s = *c.shape;
    const int active = s.active_chunks;
    for (int unit = u0; unit < u1; ++unit) {
      const int kv_head = unit / chunks, chunk = unit % chunks;
      const int c0 = chunk * s.chunk_len, c1 = min(c0 + s.chunk_len, s.context);
      // Chunks past the active ones have no positions: they only count towards the group.
      const bool skip = variant_on<T>(p, kSkipAttention);
      // Rows in passes of up to kConsumerWarps, `per_row` warps on each row at once; the warps of
      // a row then merge their partials through shared memory.
      for (int b0 = 0; b0 < p.batch && chunk < active && !skip; b0 += kConsumerWarps) {
        const auto [rows, per_row] = row_pass(p, b0);
        row_ends(s, b0, rows, c1, c.kv_ends, c.tid, kConsumerThreads);
        c.sync();  // the ends are visible (the last pass's readers are past its closing barrier)
        if (!warp_partial(c, layer, b0, rows, per_row, kv_head, c0, c1)) return false;
        c.sync();  // every warp's partial is in scratch
        for (int j = c.tid; j < rows * G * D; j += kConsumerThreads) {
          const int row = j / (G * D), h = (j / D) % G, d = j % D, b = b0 + row;
          const float* slots = c.attn + row * per_row * kWarpFloats;
          float m_max = -FLT_MAX, o = 0.f, l = 0.f;
          for (int w = 0; w < per_row; ++w) {
            const float* src = slots + w * kWarpFloats + h * kPartStride;
            if (src[D + 1] != 0.f) m_max = fmaxf(m_max, src[D]);
          }
          for (int w = 0; w < per_row; ++w) {
            const float* src = slots + w * kWarpFloats + h * kPartStride;
            const float s = rescale(src[D], src[D + 1], m_max);
            o += s * src[d], l += s * src[D + 1];
          }
          if (active == 1) {  // the whole context is in this chunk: the output, no cross-SM merge
            reinterpret_cast<uint16_t*>(p.scratch.attn_frag)[act_index<T::kWeights>(b, int64_t(kv_head * G + h) * D + d)] =
                Activations<T::kWeights>::one(o / l);  // (the O projection's activations)
            continue;
          }
          float* part = p.scratch.attn_part + ((int64_t(b) * T::kHeads + kv_head * G + h) * chunks + chunk) * kPartStride;
          part[d] = o;
          if (d == 0) part[D] = m_max, part[D + 1] = l;
        }
        c.sync();  // scratch is free for the next pass
      }
      // Every unit counts towards its kv head's group once a step (the group's epoch target),
      // after its partials (the pass's barrier ordered their writes before the release). With one
      // chunk, chunk 0 wrote the head's output itself: nothing waits for the group.
      if (c.tid == 0) signal_counter(p.scratch.attn_groups + layer * T::kKvHeads + kv_head);
    }
    if (active == 1 || variant_on<T>(p, kSkipAttention)) return true;
    // The merge, shared by the kv head's units: unit `chunk` takes the head's (row, q head) pairs
    // chunk, chunk + chunks, ... once every chunk's partials are in. Only after all of this CTA's
    // units have counted in, so that no unit waits for one queued behind it on the same SM.
    c.sync();  // every thread is past its last look at flags[0] (the task's wait) before thread 0 writes it
    for (int unit = u0; unit < u1; ++unit) {
      const int kv_head = unit / chunks, chunk = unit % chunks;
      if (chunk >= p.batch * G) continue;  // no pair of its own
      if (c.tid == 0)
        c.flags[0] = !wait_counter(p.scratch.attn_groups + layer * T::kKvHeads + kv_head, p.epoch * unsigned(chunks), p,
                                   task.index);
      c.sync();  // the wait's outcome (and, through thread 0's acquire, the partials) for everyone
      if (c.flags[0]) return false;
      merge_chunks(c, kv_head, active, chunk, chunks);
      c.sync();  // the stats scratch is free for the next unit (and the outputs written before the op's signal)
    }
    return true;
  }

  // out = sum_c exp2(m_c - M) o_c / sum_c exp2(m_c - M) l_c over the active chunks, into the O
  // projection's B fragments, for the (row, head) pairs first, first + step, ... of kv head
  // `kv_head`. First one warp per pair finds M and the sum over its chunks (lanes over chunks);
  // then every thread takes 4 dims of a pair and sums their chunks, all of a chunk group's loads
  // in flight.
  __device__ static void merge_chunks(Consumer<T>& c, int kv_head, int active, int first, int step) {
    const MegakernelParams& p = c.p;
    const int chunks = p.attn_chunks, pairs = (p.batch * G - first + step - 1) / step;  // (this unit's)
    auto part_of = [&](int i, int chunk) {  // the unit's i-th pair, pair = b * G + h
      const int pair = first + i * step, b = pair / G, head = kv_head * G + pair % G;
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
      const int bh = first + pair * step;  // (row, head) = (bh / G, bh % G)
      const int64_t k = int64_t(kv_head * G + bh % G) * D + d;  // dims d..d+3: two adjacent pairs
      bf16_t* out = p.scratch.attn_frag;  // (the O projection's activations)
      using A = Activations<T::kWeights>;
      *reinterpret_cast<uint32_t*>(out + act_index<T::kWeights>(bh / G, k)) = A::pair(o.x * inv, o.y * inv);
      *reinterpret_cast<uint32_t*>(out + act_index<T::kWeights>(bh / G, k + 2)) = A::pair(o.z * inv, o.w * inv);
    }
  }
};
#endif

// Attention is split into this many sequence chunks per kv head, so that about one
// (kv head, chunk) unit lands on each SM; the chunk length follows the context at run time.
inline int attention_chunks(const ModelDims& d, int num_sms) { return std::max(1, num_sms / d.kv_heads); }

struct AttentionOp : OpDefaults {
  static constexpr const char* kName = "attention";
  // Every CTA with units publishes once its units' outputs are written: a kv head's output is
  // written by chunk 0 (one chunk) or by the head's units, each merging its share of the pairs.
  static int units(const ModelDims& d, int num_sms) { return d.kv_heads * attention_chunks(d, num_sms); }

#ifdef __CUDACC__
  template <class T>
  __device__ static bool produce(Producer<T>& pr, Task task, int u0, int u1) {
    return AttentionKernel<T>::produce(pr, task.layer, u0, u1);
  }
  template <class T>
  __device__ static bool consume(Consumer<T>& c, Task task, int u0, int u1) {
    return AttentionKernel<T>::consume(c, task, u0, u1);
  }
#endif
};

}  // namespace flashformer