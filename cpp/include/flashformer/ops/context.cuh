// Producer and consumer contexts: what every op's two roles work with.
#pragma once

#include <cutlass/arch/barrier.h>

#include "flashformer/kernel_config.hpp"
#include "flashformer/pipeline.cuh"

namespace flashformer {

// Element index of (layer, K or V, batch row, kv head, position) in the KV cache.
template <class T>
__device__ int64_t kv_index(const MegakernelParams& p, int layer, int kv, int b, int kv_head, int pos) {
  return ((((int64_t(layer) * 2 + kv) * p.max_batch + b) * T::kKvHeads + kv_head) * p.max_seq + pos) * T::kHeadDim;
}

// The schedule's unit ranges of (op, layer): SM s owns units [begin[s], begin[s + 1]).
__device__ inline const int* schedule_of(const MegakernelParams& p, Op op, int layer) {
  return p.schedule + (layer * kNumOps + int(op)) * (gridDim.x + 1);
}

// Whether SM `sm` owns units of `op` in `layer` (its schedule range is not empty).
__device__ inline bool owns_units(const MegakernelParams& p, Op op, int layer, int sm) {
  const int* begin = schedule_of(p, op, layer);
  return begin[sm + 1] > begin[sm];
}

// Row-positions per attention unit below which splitting a context across more SMs costs more
// (in the cross-SM merge) than it saves: one row's chunk is at least kMinUnitWork / batch positions.
inline constexpr int kMinUnitWork = 256;

// One thread, in the kernel's prologue: the step's positions and attention chunking.
__device__ inline void load_step_shape(const MegakernelParams& p, StepShape& s) {
  int context = 0;
  for (int b = 0; b < p.batch; ++b) context = max(context, (s.positions[b] = int(p.positions[b])) + 1);
  const int min_chunk = max(kMinUnitWork / p.batch, 16);
  s.context = context;
  s.active_chunks = min(p.attn_chunks, (context + min_chunk - 1) / min_chunk);
  s.chunk_len = (context + s.active_chunks - 1) / s.active_chunks;
}

// The producer warp's side: streams contiguous weight bytes through the ring, stage by stage.
template <class T>
struct Producer {
  const MegakernelParams& p;
  WeightRing ring;
  int* kv_ends;             // [kMaxBatch] the producer's copy of attention's per-row ends (shared memory)
  const StepShape* shape;   // shared memory
  RingCursor cursor;
  RingCursor landed;        // the oldest stage pushed and not yet seen landed
  int in_flight = 0;        // stages pushed and not yet seen landed
  long long slot_wait = 0;  // cycles spent waiting for free stages (read by the step trace)
  long long land_wait = 0;  // cycles spent waiting for in-flight room (read by the step trace)

  // Copies `bytes` from src through the ring, at most p.inflight_stages copies outstanding: the
  // ring still fills during dependency waits, but fewer bytes queue in the memory system, so
  // the step's other global traffic (activations, signals) waits behind fewer weight reads.
  __device__ bool stream(const void* src, int64_t bytes) {
    const uint8_t* bytes_src = static_cast<const uint8_t*>(src);
    for (int64_t off = 0; off < bytes; off += kStageBytes) {
      if (!make_room() ||
          !ring.push(cursor, bytes_src + off, int(bytes - off < kStageBytes ? bytes - off : kStageBytes), p, slot_wait))
        return false;
      ++in_flight;
    }
    return true;
  }

  // One KV-cache stage (ring.push_kv) under the same in-flight limit.
  __device__ bool stream_kv(const void* keys, const void* values, int bytes) {
    if (!make_room() || !ring.push_kv(cursor, keys, values, bytes, p, slot_wait)) return false;
    ++in_flight;
    return true;
  }

  // Waits for the oldest copy to land when p.inflight_stages are outstanding.
  __device__ bool make_room() {
    if (in_flight < p.inflight_stages) return true;
    if (!ring.wait_landed(landed, p, land_wait)) return false;
    --in_flight;
    return true;
  }
};

// The consumer side: the launch parameters, the weight ring, this CTA's shared-memory regions
// and the thread's place among the consumer warps.
template <class T>
struct Consumer {
  const MegakernelParams& p;
  WeightRing ring;
  RingCursor cursor;
  bf16_t* act;         // (batch, K) activations in fragment order: normalized or staged (union region)
  float* attn;         // attention merge scratch; aliases act (never live at once)
  float* reduce;       // 2 x (warps, 32 lanes, 4): cross-warp accumulator reduction, double-buffered
  int* flags;          // [0] abort the step, [1] this CTA finished a reduction group last
  float* rinv;         // [kMaxBatch] RMSNorm scale of each batch row
  int* kv_ends;        // [kMaxBatch] attention: where each row's past positions end in the unit's chunk
  const StepShape* shape;  // shared memory
  int tid, warp, lane; // tid < kConsumerThreads
  int reduce_parity = 0;
  long long data_wait = 0;  // cycles spent waiting for weight stages to land (read by the step trace)

  __device__ void sync() const {  // all consumer warps; the producer warp never joins
    cutlass::arch::NamedBarrier::sync(kConsumerThreads, int(NamedBarrier::kConsumers));
  }
  // All consumer threads, after a barrier that ordered this CTA's outputs: count this CTA into
  // `group` and tell whether it was the last of `arrivals` this step. The last one has acquired
  // every other CTA's outputs when this returns true.
  __device__ bool finished_last(unsigned* group, unsigned arrivals) const {
    if (tid == 0) flags[1] = signal_counter(group) + 1 == p.epoch * arrivals;
    sync();
    if (!flags[1]) return false;
    fence_acq_rel_gpu();  // acquire side: the others signalled after writing
    return true;
  }
  __device__ unsigned* counter(int layer, Op op) const { return p.scratch.counters + layer * kNumOps + int(op); }
  __device__ unsigned target(Op op) const { return p.epoch * unsigned(p.op_signals[int(op)]); }
};

}  // namespace flashformer
