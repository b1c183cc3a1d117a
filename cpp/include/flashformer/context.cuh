// Producer and consumer contexts: what every op's two roles work with, and the shared-memory
// regions of a launch (carved once by the kernel's prologue).
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

// The schedule's unit ranges of task `task`: SM s owns units [begin[s], begin[s + 1]).
__device__ inline const int* schedule_of(const MegakernelParams& p, int task) {
  return p.schedule + task * (gridDim.x + 1);
}

// Whether SM `sm` owns units of task `task` (its schedule range is not empty).
__device__ inline bool owns_units(const MegakernelParams& p, int task, int sm) {
  const int* begin = schedule_of(p, task);
  return begin[sm + 1] > begin[sm];
}

// One thread, in the kernel's prologue: the step's positions and attention chunking.
__device__ inline void load_step_shape(const MegakernelParams& p, StepShape& s) {
  int context = 0;
  for (int b = 0; b < p.batch; ++b) context = max(context, (s.positions[b] = int(p.positions[b])) + 1);
  const int min_chunk = max(p.attn_min_work / p.batch, 16);  // (kDefaultAttnMinWork unless tuned)
  s.context = context;
  s.active_chunks = min(p.attn_chunks, (context + min_chunk - 1) / min_chunk);
  s.chunk_len = (context + s.active_chunks - 1) / s.active_chunks;
}

// The shared-memory regions of one launch, as smem_split() (kernel_config.hpp) plans them:
//   misc (kMiscBytes) | ring (ring_stages x kStageBytes) | union (union_bytes) | reduce (kReduceBytes)
// with the misc region's fields at the kMisc* offsets.
struct SmemRegions {
  uint8_t* ring_data;
  uint8_t* union_region;
  float* reduce;
  uint64_t* barriers;  // full[kMaxStages], then empty[kMaxStages]
  int* flags;
  float* rinv;
  int* kv_ends;        // [2][kMaxBatch]: the consumers', then the producer's
  StepShape* shape;
  __device__ SmemRegions(uint8_t* smem, const MegakernelParams& p)
      : ring_data(smem + kMiscBytes),
        union_region(ring_data + p.ring_stages * kStageBytes),
        reduce(reinterpret_cast<float*>(union_region + p.union_bytes)),
        barriers(reinterpret_cast<uint64_t*>(smem)),
        flags(reinterpret_cast<int*>(smem + kMiscFlags)),
        rinv(reinterpret_cast<float*>(smem + kMiscRinv)),
        kv_ends(reinterpret_cast<int*>(smem + kMiscKvEnds)),
        shape(reinterpret_cast<StepShape*>(smem + kMiscShape)) {}
  template <class T>
  __device__ WeightRing<T> ring(const MegakernelParams& p) const {
    return {ring_data, barriers, barriers + kMaxStages, p.ring_stages};
  }
};

// The producer warp's side: streams contiguous weight bytes through the ring, stage by stage.
template <class T>
struct Producer {
  const MegakernelParams& p;
  WeightRing<T> ring;
  int* kv_ends;             // [kMaxBatch] the producer's copy of attention's per-row ends (shared memory)
  const StepShape* shape;   // shared memory
  RingCursor cursor;
  RingCursor landed;        // the oldest stage pushed and not yet seen landed
  int in_flight = 0;        // stages pushed and not yet seen landed
  long long slot_wait = 0;  // cycles spent waiting for free stages (read by the step trace)
  long long land_wait = 0;  // cycles spent waiting for in-flight room (read by the step trace)

  __device__ Producer(const MegakernelParams& p_, const SmemRegions& s)
      : p(p_), ring(s.ring<T>(p_)), kv_ends(s.kv_ends + kMaxBatch), shape(s.shape) {}

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

  // One FP8 KV-cache stage (ring.push_kv_fp8) under the same in-flight limit.
  __device__ bool stream_kv_fp8(const void* keys, const void* values, const float* key_scales, int key_scale_bytes,
                                const float* value_scales, int value_scale_bytes, int bytes, int scale_offset) {
    if (!make_room() || !ring.push_kv_fp8(cursor, keys, values, key_scales, key_scale_bytes, value_scales,
                                          value_scale_bytes, bytes, scale_offset, p, slot_wait))
      return false;
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
  WeightRing<T> ring;
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

  __device__ Consumer(const MegakernelParams& p_, const SmemRegions& s, int tid_)
      : p(p_),
        ring(s.ring<T>(p_)),
        act(reinterpret_cast<bf16_t*>(s.union_region)),
        attn(reinterpret_cast<float*>(s.union_region)),
        reduce(s.reduce),
        flags(s.flags),
        rinv(s.rinv),
        kv_ends(s.kv_ends),
        shape(s.shape),
        tid(tid_),
        warp(tid_ / kWarpSize),
        lane(tid_ % kWarpSize) {}

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
  __device__ unsigned* counter(int task) const { return p.scratch.counters + task; }
  __device__ unsigned target(int op) const { return p.epoch * unsigned(p.arrivals[op]); }
};

}  // namespace flashformer
