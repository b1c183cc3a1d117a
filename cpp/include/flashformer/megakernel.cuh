// The persistent decode-step kernel: one CTA per SM, launched cooperatively. Warps
// [0, kConsumerWarps) compute, the last warp streams weights through the ring. Both roles walk
// the same task order (for_each_task), so the producer's stages arrive in the order the
// consumers take them, and the producer runs ahead across op and layer boundaries.
#pragma once

#include "flashformer/kernel_config.hpp"
#include "flashformer/ops/attention.cuh"
#include "flashformer/ops/context.cuh"
#include "flashformer/ops/embed.cuh"
#include "flashformer/ops/lm_head_argmax.cuh"
#include "flashformer/ops/qkv_rope_kv_append.cuh"
#include "flashformer/ops/residual_add.cuh"
#include "flashformer/ops/silu_mul.cuh"
#include "flashformer/sync.cuh"

namespace flashformer {

// Calls fn(Op, layer, first unit, end unit) for this SM's share of every op of the step, in
// order; stops early when fn returns false.
template <class Fn>
__device__ void for_each_task(const MegakernelParams& p, Fn&& fn) {
  auto run = [&](Op op, int layer) {
    const int* begin = schedule_of(p, op, layer);
    return fn(op, layer, begin[blockIdx.x], begin[blockIdx.x + 1]);
  };
  if (!run(Op::kEmbed, 0)) return;
  for (int layer = 0; layer < p.n_layers; ++layer)
    for (Op op : {Op::kQkv, Op::kAttention, Op::kOProj, Op::kGateUp, Op::kDown})
      if (!run(op, layer)) return;
  run(Op::kLmHead, p.n_layers - 1);
}

// Dispatch an op id to its struct: f(OpType{}) with OpType one of the op structs.
template <class T, class F>
__device__ bool with_op(Op op, F&& f) {
  switch (op) {
    case Op::kEmbed: return f(EmbedOp<T>{});
    case Op::kQkv: return f(QkvOp<T>{});
    case Op::kAttention: return f(AttentionOp<T>{});
    case Op::kOProj: return f(OProjOp<T>{});
    case Op::kGateUp: return f(GateUpOp<T>{});
    case Op::kDown: return f(DownOp<T>{});
    default: return f(LmHeadOp<T>{});
  }
}

// Ops that publish their own completion (last-finisher reductions); the rest signal once per CTA.
constexpr bool signals_itself(Op op) { return op == Op::kAttention || op == Op::kLmHead; }

// This SM's part of the step trace (trace.hpp). Holds no state: the pointer is recomputed from
// the (constant-bank) launch parameters at each write, so tracing costs no live registers.
struct TraceWriter {
  const MegakernelParams& p;
  __device__ bool on() const { return p.trace != nullptr; }
  __device__ unsigned long long* sm() const { return p.trace + blockIdx.x * trace_words_per_sm(p.n_layers); }
  __device__ void header(TraceHeader h, unsigned long long v) const { sm()[int(h)] = v; }
  __device__ void task(Op op, int layer, TraceField f, unsigned long long v) const {
    sm()[kTraceHeader + trace_task(op, layer, p.n_layers) * kTraceFields + int(f)] = v;
  }
};

// (Called once, and inlined so that its state stays in registers.)
template <class T>
__device__ __forceinline__ void run_producer(Producer<T>& pr) {
  const TraceWriter tr{pr.p};
  for_each_task(pr.p, [&](Op op, int layer, int u0, int u1) {
    if (u0 == u1) return true;
    if (tr.on()) tr.task(op, layer, TraceField::kProduceStartNs, global_ns());
    const bool ok = with_op<T>(op, [&](auto o) { return decltype(o)::produce(pr, layer, u0, u1); });
    if (tr.on()) {
      tr.task(op, layer, TraceField::kProduceEndNs, global_ns());
      tr.task(op, layer, TraceField::kSlotWaitCycles, pr.slot_wait);
      tr.task(op, layer, TraceField::kLandWaitCycles, pr.land_wait);
      pr.slot_wait = pr.land_wait = 0;
    }
    return ok;
  });
}

// (Called once, and inlined: as a function of its own, c went to local memory.)
template <class T>
__device__ __forceinline__ void run_consumers(Consumer<T>& c) {
  const MegakernelParams& p = c.p;
  const TraceWriter tr{p};
  if (c.tid == 0 && tr.on()) tr.header(TraceHeader::kStartNs, global_ns()), tr.header(TraceHeader::kStartCycles, clock64());
  for_each_task(p, [&](Op op, int layer, int u0, int u1) {
    if (u0 == u1) return true;  // nothing to do, nothing to wait for
    if (c.tid == 0 && tr.on()) tr.task(op, layer, TraceField::kTaskStartNs, global_ns());
    if (op != Op::kEmbed && !(p.timing_variant & kSkipWaits)) {
      const Dependency dep = dependency_at(op, layer);
      if (c.tid == 0) c.flags[0] = !wait_counter(c.counter(dep.layer, dep.op), c.target(dep.op), p, int(op), layer);
      c.sync();  // the wait's outcome (and, through thread 0's acquire, the inputs) for everyone
      if (c.flags[0]) return false;
    }
    if (c.tid == 0 && tr.on()) tr.task(op, layer, TraceField::kReadyNs, global_ns());
    if (!with_op<T>(op, [&](auto o) { return decltype(o)::consume(c, layer, u0, u1); })) return false;
    if (c.tid == 0 && tr.on()) {
      tr.task(op, layer, TraceField::kComputedNs, global_ns());
      tr.task(op, layer, TraceField::kDataWaitCycles, c.data_wait);
      c.data_wait = 0;
    }
    if (!signals_itself(op)) {
      c.sync();  // this CTA's outputs of the op are written
      if (c.tid == 0 && tr.on()) tr.task(op, layer, TraceField::kSyncedNs, global_ns());
      const bool hooked = p.debug_skip_signal == int(op) && blockIdx.x == 0;  // test hook: a lost signal
      if (c.tid == 0 && !hooked) publish(c.counter(layer, op), p);
    }
    if (c.tid == 0 && tr.on()) {
      const unsigned long long now = global_ns();
      if (signals_itself(op)) tr.task(op, layer, TraceField::kSyncedNs, now);  // its own barrier and signal are inside
      tr.task(op, layer, TraceField::kSignalledNs, now);
    }
    return true;
  });
  if (c.tid == 0 && tr.on()) tr.header(TraceHeader::kEndNs, global_ns()), tr.header(TraceHeader::kEndCycles, clock64());
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) megakernel(const __grid_constant__ MegakernelParams p) {
  // misc | ring (ring_stages x kStageBytes) | union (union_bytes) | reduce: see smem_split()
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* ring_data = smem + kMiscBytes;
  uint8_t* union_region = ring_data + p.ring_stages * kStageBytes;
  float* reduce = reinterpret_cast<float*>(union_region + p.union_bytes);
  uint64_t* barriers = reinterpret_cast<uint64_t*>(smem);  // the misc region: kernel_config.hpp
  int* flags = reinterpret_cast<int*>(smem + kMiscFlags);
  float* rinv = reinterpret_cast<float*>(smem + kMiscRinv);
  int* kv_ends = reinterpret_cast<int*>(smem + kMiscKvEnds);
  StepShape* shape = reinterpret_cast<StepShape*>(smem + kMiscShape);
  const WeightRing ring{ring_data, barriers, barriers + kMaxStages, p.ring_stages};

  if (threadIdx.x == 0) ring.init(), load_step_shape(p, *shape);
  __syncthreads();  // barriers initialized and the step's shape loaded before any role touches them

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (warp_role(warp) != WarpRole::kConsumer) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegisters));  // the whole warpgroup
    if (warp_role(warp) == WarpRole::kProducer && lane == 0) {
      Producer<T> pr{p, ring, kv_ends + kMaxBatch, shape};
      run_producer(pr);
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegisters));
  Consumer<T> c{p,
                ring,
                {},
                reinterpret_cast<bf16_t*>(union_region),
                reinterpret_cast<float*>(union_region),
                reduce,
                flags,
                rinv,
                kv_ends,
                shape,
                int(threadIdx.x),
                warp,
                lane};
  run_consumers(c);
}

}  // namespace flashformer
