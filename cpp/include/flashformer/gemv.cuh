// The matmul op: rows of a fragment-ordered weight matrix stream through the ring; each
// consumer warp multiplies every 8th fragment of a stage on the tensor cores against the
// batch's activations (mma.m16n8k16: 16 weight rows x 8 batch columns; an e4m3 fragment is
// turned into two f16 ones in registers, multiplied by f16 activations, and its row scales
// multiply the sums), the 8 partial tiles
// are summed through shared memory, and warp 0 hands the 16x8 result to the op's epilogue.
// Units are 16-row blocks; a row block's K columns span one or more ring stages.
#pragma once

#include "flashformer/context.cuh"
#include "flashformer/rmsnorm.cuh"
#include "flashformer/weight_layout.cuh"

namespace flashformer {

// A lane's B registers for one weight fragment of format F: bf16, one k block's two (8 bytes); e4m3,
// the 32-k fragment's four f16 pairs (16 bytes: fp8_act_fragment_index).
template <WeightFormat F>
using ActVector = std::conditional_t<F == WeightFormat::kFp8, uint4, uint2>;

// B fragments from this CTA's shared memory, `rows` (the batch) rows per fragment's k: written by
// rmsnorm_to_fragments or copied by stage_activations.
template <WeightFormat F>
struct SmemActivations {
  static constexpr bool kLoadAhead = false;  // (a shared-memory load: issued beside the stage's own)
  const bf16_t* act;
  int rows;
  __device__ ActVector<F> load(int f, int g, int t) const {
    return reinterpret_cast<const ActVector<F>*>(act)[act_lane_vector(f, g, t, rows)];
  }
};

// B fragments another op wrote to global memory this step (read through L2).
template <WeightFormat F>
struct GlobalActivations {
  static constexpr bool kLoadAhead = true;  // loaded a stage ahead: an L2 round trip
  const bf16_t* act;
  __device__ ActVector<F> load(int f, int g, int t) const {
    return __ldcg(reinterpret_cast<const ActVector<F>*>(act) + act_lane_vector(f, g, t));
  }
};

// Copies the batch rows of a global fragment-ordered activation of K = kblocks * 16 into shared
// memory (SmemActivations order): one burst of 16-byte L2 reads instead of a round trip per
// stage. False when it does not fit; the caller then reads B from global memory.
template <class T, WeightFormat F>
__device__ bool stage_activations(Consumer<T>& c, const bf16_t* src, int kblocks) {
  const int rows = c.p.batch;
  if (int64_t(rows) * kblocks * kKBlock * 2 > c.p.union_bytes) return false;
  constexpr int kVecsPerRow = 4 * int(sizeof(ActVector<F>)) / 16;  // uint4 per batch row of a fragment's k (its 4 lanes t)
  const int frags = kblocks / fragment_kblocks(F);
  const uint4* from = reinterpret_cast<const uint4*>(src);  // [fragment][kMaxBatch][kVecsPerRow]
  uint4* to = reinterpret_cast<uint4*>(c.act);              // [fragment][rows][kVecsPerRow]
  const int n = frags * rows * kVecsPerRow;
  for (int i = c.tid; i < n; i += kConsumerThreads) {
    const int f = i / (rows * kVecsPerRow), rest = i % (rows * kVecsPerRow);
    to[i] = __ldcg(from + f * kMaxBatch * kVecsPerRow + rest);
  }
  c.sync();  // staged before any warp loads a fragment
  return true;
}

// Accumulator tile of lane (g = lane/4, t = lane%4): acc[q] is (row g, batch 2t+q) and
// acc[2+q] is (row g+8, batch 2t+q), for q in {0, 1}.
using AccTile = float[4];

// One row block: multiply its fragments (format F: kblocks of them in bf16, kblocks / 2 in e4m3)
// from the ring. This warp's partial sum lands in acc (e4m3: before the row scales). False when
// the step was aborted.
template <class T, WeightFormat F, class Source>
__device__ bool gemv_row_block(Consumer<T>& c, const Source& src, int kblocks, AccTile& acc) {
  constexpr int kPerWarp = kFragmentsPerStage / kConsumerWarps;  // fragments of a stage per warp
  constexpr int kHalves = fragment_kblocks(F);                   // activation k blocks per fragment
  const int frags = kblocks / kHalves;
  if (variant_on<T>(c.p, kSkipMath)) {  // timing only: take and free the stages, nothing else
    for (int f0 = 0; f0 < frags; f0 += kFragmentsPerStage) {
      if (!c.ring.wait_full(c.cursor, c.p, c.data_wait)) return false;
      c.ring.release(c.cursor);
    }
    return true;
  }
  const int g = c.lane / 4, t = c.lane % 4;
  const bool live = g < c.p.batch;  // batch columns past the batch multiply zeros
  using Vec = ActVector<F>;
  // B fragments of the stage starting at fragment f0 (activations never depend on the ring).
  auto load_b = [&](int f0, Vec (&b)[kPerWarp]) {
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int f = f0 + c.warp + i * kConsumerWarps;
      b[i] = live && f < frags ? src.load(f, g, t) : Vec{};
    }
  };
  // One accumulator per fragment slot and half: the mma chains are independent, so the tensor
  // cores overlap them instead of waiting on one accumulator.
  float part[kPerWarp][kHalves][4];
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i)
#pragma unroll
    for (int h = 0; h < kHalves; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j) part[i][h][j] = 0.f;
  // B from L2 is loaded a stage ahead (next), from shared memory beside the stage's A fragments:
  // a copy of every register a stage fewer.
  Vec next[kPerWarp];
  if constexpr (Source::kLoadAhead) load_b(0, next);
  for (int f0 = 0; f0 < frags; f0 += kFragmentsPerStage) {
    Vec b[kPerWarp];
    if constexpr (Source::kLoadAhead) {
#pragma unroll
      for (int i = 0; i < kPerWarp; ++i) b[i] = next[i];
      load_b(f0 + kFragmentsPerStage, next);
    }
    const int n = min(kFragmentsPerStage, frags - f0);
    if (!c.ring.wait_full(c.cursor, c.p, c.data_wait)) return false;
    const uint4* stage = c.ring.stage(c.cursor.stage);  // (fragments, 32 lanes) x 16 bytes
    // All of this warp's A fragments into registers at once, then the stage is free: the
    // producer refills it while the tensor cores work.
    uint4 a[kPerWarp];
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int f = c.warp + i * kConsumerWarps;
      a[i] = f < n ? stage[f * kWarpSize + c.lane] : make_uint4(0u, 0u, 0u, 0u);
    }
    c.ring.release(c.cursor);
    if constexpr (!Source::kLoadAhead) load_b(f0, b);  // (the dequantization of A hides their latency)
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      if constexpr (F == WeightFormat::kFp8) {
        uint4 lo, hi;
        dequant_fp8_fragment(a[i], lo, hi);
        mma_fragment<F>(part[i][0], lo, make_uint2(b[i].x, b[i].y));
        mma_fragment<F>(part[i][1], hi, make_uint2(b[i].z, b[i].w));
      } else {
        mma_fragment(part[i][0], a[i], b[i]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[j] = part[0][0][j];
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i)
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
        if (i + h > 0) acc[j] += part[i][h][j];
  }
  return true;
}

// Sum the consumer warps' tiles; warp 0 ends with the total in acc.
template <class T>
__device__ void reduce_row_block(Consumer<T>& c, AccTile& acc) {
  float4* buf = reinterpret_cast<float4*>(c.reduce) + c.reduce_parity * kConsumerWarps * kWarpSize;
  // Two buffers: warp 0 may still read one while the others fill the next row block's.
  c.reduce_parity ^= 1;
  if (c.warp != 0) buf[c.warp * kWarpSize + c.lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  c.sync();  // all partial tiles written
  if (c.warp == 0)
    for (int w = 1; w < kConsumerWarps; ++w) {
      const float4 v = buf[w * kWarpSize + c.lane];
      acc[0] += v.x, acc[1] += v.y, acc[2] += v.z, acc[3] += v.w;
    }
}

// Fetches the line at p into L2: no register is written, nothing waits for it.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Epilogue interface: `Epilogue e(c, task)`; on warp 0, e.prefetch(rb) before the row block's
// weights stream (issues the loads of whatever row_block will read, and uses none of them, so
// that their global round trips pass behind the row block's stream instead of holding warp 0 at
// its start while the other warps wait for it at the reduction) and e.row_block(rb, acc) after
// it; e.finish() on all consumer threads after the last row block (before the op's signal).
// Matrix m in format F: e4m3 rows are scaled (m.scale) before the epilogue sees them.
template <class T, WeightFormat F, class Source, class Epilogue>
__device__ bool run_matmul(Consumer<T>& c, const Source& src, int kblocks, const Matrix& m, const Task& task, int u0,
                           int u1) {
  Epilogue epi(c, task);
  // Warp 0, e4m3: the row scales. Each row block's are loaded before its stream and first used after
  // it, and the next row block's are fetched into L2 meanwhile, so the loads' round trips pass behind
  // the stream instead of holding warp 0 at the row block's start (while the other warps wait for it
  // at the reduction). The pointer is read once: m lives in global memory, and inside the loop it
  // would be read again, an L2 round trip the scales' loads would wait for.
  const float* const scales = F == WeightFormat::kFp8 ? m.scale : nullptr;
  for (int rb = u0; rb < u1; ++rb) {
    AccTile acc;
    float scale[2];  // warp 0, e4m3: the scales of rows g and g + 8, as loaded
    if (c.warp == 0) {
      epi.prefetch(rb);
      if constexpr (F == WeightFormat::kFp8) {
        const float* s = scales + rb * kRowBlock + c.lane / 4;
        scale[0] = __ldg(s), scale[1] = __ldg(s + 8);
        if (c.lane == 0 && rb + 1 < u1) prefetch_l2(scales + (rb + 1) * kRowBlock);  // (16 floats: one line)
      }
    }
    if (!gemv_row_block<T, F>(c, src, kblocks, acc)) return false;
    if (!variant_on<T>(c.p, kSkipMath | kSkipReduce)) reduce_row_block(c, acc);
    if (c.warp == 0 && !variant_on<T>(c.p, kSkipEpilogue)) {
      if constexpr (F == WeightFormat::kFp8) {
        // (times the activations' 2^shift)
        const float s0 = scale[0] * Activations<F>::kUnscale, s1 = scale[1] * Activations<F>::kUnscale;
        acc[0] *= s0, acc[1] *= s0, acc[2] *= s1, acc[3] *= s1;
      }
      epi.row_block(rb, acc);
    }
  }
  epi.finish();
  return true;
}

// Matmul whose B operand another op wrote to global memory this step: staged into shared memory
// when it fits, read from L2 (a stage ahead) when it does not.
template <class T, WeightFormat F, class Epilogue>
__device__ bool run_matmul_global_b(Consumer<T>& c, const bf16_t* act, int kblocks, const Matrix& m, const Task& task,
                                    int u0, int u1) {
  if (stage_activations<T, F>(c, act, kblocks))
    return run_matmul<T, F, SmemActivations<F>, Epilogue>(c, {c.act, c.p.batch}, kblocks, m, task, u0, u1);
  return run_matmul<T, F, GlobalActivations<F>, Epilogue>(c, {act}, kblocks, m, task, u0, u1);
}

// RMSNorm of x (norm `norm`, whose rows the task before `task` wrote: rmsnorm.cuh) into shared
// memory, then the matmul over it (K = hidden).
template <class T, WeightFormat F, class Epilogue>
__device__ bool norm_then_matmul(Consumer<T>& c, const bf16_t* norm_weight, int norm, const Matrix& m, Task task,
                                 int u0, int u1) {
  rmsnorm_to_fragments<T, F>(c, norm_weight, norm, task.index - 1);
  return run_matmul<T, F, SmemActivations<F>, Epilogue>(c, {c.act, c.p.batch}, T::kHidden / kKBlock, m, task, u0,
                                                        u1);
}

// Streams row blocks [u0, u1) of a fragment-ordered (rows, K) matrix in format F, each row block
// on its own stages (the consumers' gemv_row_block chunks it the same way).
template <WeightFormat F, class T>
__device__ bool stream_row_blocks(Producer<T>& pr, const Matrix& m, int K, int u0, int u1) {
  const int64_t bytes = row_block_bytes(K, F);
  for (int rb = u0; rb < u1; ++rb)
    if (!pr.stream(static_cast<const uint8_t*>(m.data) + rb * bytes, bytes)) return false;
  return true;
}

}  // namespace flashformer
