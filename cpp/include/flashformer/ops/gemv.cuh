// The matmul op: rows of a fragment-ordered weight matrix stream through the ring; each ring
// stage is multiplied by kWarpsPerStage consumer warps on the tensor cores against the batch's
// activations (mma.m16n8k16: 16 weight rows x 8 batch columns), several stages at once; the
// warps' partial tiles of a row block are summed through shared memory and one warp hands the
// 16x8 result to the op's epilogue. Units are 16-row blocks; a row block's K columns span one or
// more ring stages. (Few warps per stage: the per-stage work of waiting, loading and freeing is
// done by few warps; not one: a stage's latency sets how soon an op's last stage is done.)
#pragma once

#include "flashformer/ops/context.cuh"
#include "flashformer/ops/rmsnorm.cuh"
#include "flashformer/weight_layout.cuh"

namespace flashformer {

// B fragments from this CTA's shared memory, `rows` (the batch) rows per k block: written by
// rmsnorm_to_fragments or copied by stage_activations.
struct SmemActivations {
  const bf16_t* act;
  int rows;
  __device__ uint2 load(int kb, int g, int t) const {
    return reinterpret_cast<const uint2*>(act)[act_lane_vector(kb, g, t, rows)];
  }
};

// B fragments another op wrote to global memory this step (read through L2).
struct GlobalActivations {
  const bf16_t* act;
  __device__ uint2 load(int kb, int g, int t) const {
    return __ldcg(reinterpret_cast<const uint2*>(act) + act_lane_vector(kb, g, t));
  }
};

// Copies the batch rows of a global fragment-ordered activation of K = kblocks * 16 into shared
// memory (SmemActivations order): one burst of 16-byte L2 reads instead of a round trip per
// stage. False when it does not fit; the caller then reads B from global memory.
template <class T>
__device__ bool stage_activations(Consumer<T>& c, const bf16_t* src, int kblocks) {
  const int rows = c.p.batch;
  if (int64_t(rows) * kblocks * kKBlock * 2 > c.p.union_bytes) return false;
  constexpr int kVecsPerRow = kKBlock * 2 / 16;  // uint4 per batch row of a k block
  const uint4* from = reinterpret_cast<const uint4*>(src);  // [kb][kMaxBatch][kVecsPerRow]
  uint4* to = reinterpret_cast<uint4*>(c.act);              // [kb][rows][kVecsPerRow]
  const int n = kblocks * rows * kVecsPerRow;
  for (int i = c.tid; i < n; i += kConsumerThreads) {
    const int kb = i / (rows * kVecsPerRow), rest = i % (rows * kVecsPerRow);
    to[i] = __ldcg(from + kb * kMaxBatch * kVecsPerRow + rest);
  }
  c.sync();  // staged before any warp loads a fragment
  return true;
}

// Accumulator tile of lane (g = lane/4, t = lane%4): acc[q] is (row g, batch 2t+q) and
// acc[2+q] is (row g+8, batch 2t+q), for q in {0, 1}.
using AccTile = float[4];

// This warp's part of a stage: fragments [f0, f0 + kStageFragments) of it, k blocks kb0 + f of
// the row block (those < n exist), times the batch's B fragments, summed into part
// (kAccumulators independent mma chains). Waits for the stage at `at` and frees its part once
// the A fragments are in registers. False when the step was aborted.
inline constexpr int kStageFragments = kFragmentsPerStage / kWarpsPerStage;  // per warp
inline constexpr int kChunk = kStageFragments <= 16 ? kStageFragments : 4;  // A fragments loaded together
inline constexpr int kAccumulators = 4;  // independent accumulator tiles per warp

template <class T, class Source>
__device__ bool mma_stage(Consumer<T>& c, const Source& src, RingCursor at, int kb0, int f0, int n,
                          float (&part)[kAccumulators][4]) {
  const int g = c.lane / 4, t = c.lane % 4;
  const bool live = g < c.p.batch;  // batch columns past the batch multiply zeros
  auto load_b = [&](int f1, uint2 (&b)[kChunk]) {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) b[i] = live && f1 + i < n ? src.load(kb0 + f1 + i, g, t) : make_uint2(0u, 0u);
  };
  uint2 b[kChunk];
  load_b(f0, b);  // B never depends on the ring: its first loads overlap the wait
  if (!c.ring.wait_full(at, c.p, c.data_wait)) return false;
  const uint4* stage = c.ring.stage(at.stage);  // (fragments, 32 lanes) x 16 bytes
#pragma unroll
  for (int f1 = f0; f1 < f0 + kStageFragments; f1 += kChunk) {
    uint4 a[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) a[i] = f1 + i < n ? stage[(f1 + i) * kWarpSize + c.lane] : make_uint4(0u, 0u, 0u, 0u);
    uint2 b_next[kChunk];
    if (f1 + kChunk < f0 + kStageFragments) load_b(f1 + kChunk, b_next);
    else c.ring.release(at);  // every A fragment of this warp's part is loaded
#pragma unroll
    for (int i = 0; i < kChunk; ++i) mma_fragment(part[i % kAccumulators], a[i], b[i]);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) b[i] = b_next[i];
  }
  return true;
}

// Epilogue interface: `Epilogue e(c, layer)` on every consumer warp; e.prefetch(rb) before the
// row block's weights stream and e.row_block(rb, acc) after them, both on the warp that finishes
// row block rb (prefetch loads whatever row_block will read, so no global round trip follows the
// reduction); e.finish() on all consumer threads after the last row block (before the op's
// signal) combines what each warp's row blocks left.
//
// Work split: kStageOwners stages are worked on at once, each by kWarpsPerStage warps (owner
// o = warp / kWarpsPerStage; its warps take contiguous parts of the stage's fragments). A row
// block spans S stages (K / 512 rounded up). When S <= kStageOwners, a group of kStageOwners / S
// row blocks takes one stage per owner (owner o: row block o / S, its stage o % S); otherwise a
// group is one row block, in rounds of kStageOwners stages (owner o: stages o, o + kStageOwners,
// ...). After a group the warps' partial tiles are summed in shared memory in a fixed order, and
// warp k finishes the group's k-th row block. A CTA barrier ends every group and round, so no
// warp waits for a stage more than kStageOwners past the oldest one not yet consumed: with a
// ring of at least that many stages (kMinStages) the full barrier's phase parity it waits on is
// unambiguous.
template <class T, class Source, class Epilogue>
__device__ bool run_matmul(Consumer<T>& c, const Source& src, int kblocks, int layer, int u0, int u1) {
  Epilogue epi(c, layer);
  const MegakernelParams& p = c.p;
  const int S = (kblocks + kFragmentsPerStage - 1) / kFragmentsPerStage;  // stages per row block
  const int G = S <= kStageOwners ? kStageOwners / S : 1;                // row blocks per group
  const int owner = c.warp / kWarpsPerStage, f0 = c.warp % kWarpsPerStage * kStageFragments;
  const bool math = !(p.timing_variant & kSkipMath), reduce = math && !(p.timing_variant & kSkipReduce);
  for (int rb0 = u0; rb0 < u1; rb0 += G) {
    const int rows = min(G, u1 - rb0), stages = rows * S;  // this group's
    if (c.warp < rows) epi.prefetch(rb0 + c.warp);
    float part[kAccumulators][4] = {};
    for (int first = 0; first < stages; first += kStageOwners) {  // rounds
      const int j = first + owner;  // this warp's stage of the group
      if (j < stages) {
        RingCursor at = c.cursor;
        at.advance(c.ring.stages, j);
        const int kb0 = (j % S) * kFragmentsPerStage, n = min(kFragmentsPerStage, kblocks - kb0);
        if (math) {
          if (!mma_stage(c, src, at, kb0, f0, n, part)) return false;
        } else {  // timing only: take and free the stage, nothing else
          if (!c.ring.wait_full(at, p, c.data_wait)) return false;
          c.ring.release(at);
        }
      }
      if (first + kStageOwners < stages) c.sync();  // round barrier (see above)
    }
    c.cursor.advance(c.ring.stages, stages);
    AccTile acc;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc[j] = part[0][j];
#pragma unroll
      for (int i = 1; i < kAccumulators; ++i) acc[j] += part[i][j];
    }
    // Cross-warp sum: row block k of the group is the sum of the warps of owners [k S, k S + min(S, owners)).
    float4* buf = reinterpret_cast<float4*>(c.reduce) + c.reduce_parity * kConsumerWarps * kWarpSize;
    c.reduce_parity ^= 1;  // two buffers: the next group fills the other while this one is read
    if (reduce && owner < stages) buf[c.warp * kWarpSize + c.lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    c.sync();  // partial tiles written, and the group barrier (every stage of the group consumed)
    if (c.warp >= rows) continue;
    if (reduce) {
      const int w0 = c.warp * S * kWarpsPerStage, w1 = w0 + min(S, kStageOwners) * kWarpsPerStage;
      acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
      for (int w = w0; w < w1; ++w) {
        const float4 v = buf[w * kWarpSize + c.lane];
        acc[0] += v.x, acc[1] += v.y, acc[2] += v.z, acc[3] += v.w;
      }
    }
    if (!(p.timing_variant & kSkipEpilogue)) epi.row_block(rb0 + c.warp, acc);
  }
  epi.finish();
  return true;
}

// Matmul whose B operand another op wrote to global memory this step: staged into shared memory
// when it fits, read from L2 (a stage ahead) when it does not.
template <class T, class Epilogue>
__device__ bool run_matmul_global_b(Consumer<T>& c, const bf16_t* act, int kblocks, int layer, int u0, int u1) {
  if (stage_activations(c, act, kblocks))
    return run_matmul<T, SmemActivations, Epilogue>(c, {c.act, c.p.batch}, kblocks, layer, u0, u1);
  return run_matmul<T, GlobalActivations, Epilogue>(c, {act}, kblocks, layer, u0, u1);
}

// RMSNorm of x (norm `norm`, its rows last written by `writer` of `writer_layer`: rmsnorm.cuh)
// into shared memory, then the matmul over it (K = hidden).
template <class T, class Epilogue>
__device__ bool norm_then_matmul(Consumer<T>& c, const bf16_t* norm_weight, int norm, Op writer, int writer_layer,
                                 int layer, int u0, int u1) {
  rmsnorm_to_fragments(c, norm_weight, norm, writer, writer_layer);
  return run_matmul<T, SmemActivations, Epilogue>(c, {c.act, c.p.batch}, T::kHidden / kKBlock, layer, u0, u1);
}

// Streams row blocks [u0, u1) of a fragment-ordered (rows, K) matrix, each row block on its own
// stages (the consumers' gemv_row_block chunks it the same way).
template <class T>
__device__ bool stream_row_blocks(Producer<T>& pr, const bf16_t* w, int K, int u0, int u1) {
  const int64_t row_block_bytes = int64_t(K) * kRowBlock * 2;
  for (int rb = u0; rb < u1; ++rb)
    if (!pr.stream(reinterpret_cast<const uint8_t*>(w) + rb * row_block_bytes, row_block_bytes)) return false;
  return true;
}

}  // namespace flashformer
