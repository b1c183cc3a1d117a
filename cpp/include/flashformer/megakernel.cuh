// The persistent decode-step kernel: one CTA per SM, launched cooperatively. Warps
// [0, kConsumerWarps) compute, the producer warp streams weights through the ring. Both roles
// walk the same task order (for_each_task over StepOps), so the producer's stages arrive in the
// order the consumers take them, and the producer runs ahead across op and layer boundaries.
#pragma once

#include <type_traits>

#include "flashformer/context.cuh"
#include "flashformer/kernel_config.hpp"
#include "flashformer/ops.hpp"
#include "flashformer/sync.cuh"
#include "flashformer/trace.hpp"

namespace flashformer {

// fn(op) for each op of `list` in order, op a default-constructed op struct; stops at the first
// that returns false (and returns false).
template <class Fn, class... Os>
__device__ __forceinline__ bool for_each_op(OpList<Os...>, Fn&& fn) {
  return (fn(Os{}) && ...);
}

// Calls fn(op, task, first unit, end unit) for this SM's share of every task of the step, in the
// task order of ops.hpp; stops early when fn returns false.
template <class Fn>
__device__ __forceinline__ void for_each_task(const MegakernelParams& p, Fn&& fn) {
  int index = 0, prev_op = -1;
  // fn for the ops of StepOps whose scope is S (a std::integral_constant), in `layer`
  auto in_scope = [&](auto scope, int layer) {
    return [&, layer](auto op) {
      using Op = decltype(op);
      if constexpr (Op::kScope != decltype(scope)::value) {
        return true;
      } else {
        const Task task{index++, layer, op_index<Op>, prev_op};
        prev_op = task.op;
        const int* begin = schedule_of(p, task.index);
        return fn(op, task, begin[blockIdx.x], begin[blockIdx.x + 1]);
      }
    };
  };
  using First = std::integral_constant<Scope, Scope::kOnceFirst>;
  using Every = std::integral_constant<Scope, Scope::kEveryLayer>;
  using Last = std::integral_constant<Scope, Scope::kOnceLast>;
  if (!for_each_op(StepOps{}, in_scope(First{}, 0))) return;
  for (int layer = 0; layer < p.n_layers; ++layer)
    if (!for_each_op(StepOps{}, in_scope(Every{}, layer))) return;
  for_each_op(StepOps{}, in_scope(Last{}, p.n_layers - 1));
}
// This SM's part of the step trace (trace.hpp), written by the instrumented build only. Holds no
// state: the pointer is recomputed from the (constant-bank) launch parameters at each write, so
// tracing costs no live registers.
template <class T>
struct TraceWriter {
  const MegakernelParams& p;
  __device__ bool on() const {
    if constexpr (T::kInstrumented)
      return p.instr.trace != nullptr;
    else
      return false;
  }
  __device__ unsigned long long* sm() const { return p.instr.trace + blockIdx.x * trace_words_per_sm(p.n_layers); }
  __device__ void header(TraceHeader h, unsigned long long v) const { sm()[int(h)] = v; }
  __device__ void task(const Task& t, TraceField f, unsigned long long v) const {
    sm()[kTraceHeader + t.index * kTraceFields + int(f)] = v;
  }
};

// Test hook of the instrumented build: SM 0 never signals op `instr.skip_signal_op` (a lost signal).
template <class T>
__device__ __forceinline__ bool signal_skipped(const MegakernelParams& p, const Task& task) {
  if constexpr (T::kInstrumented)
    return p.instr.skip_signal_op == task.op && blockIdx.x == 0;
  else
    return false;
}

// (Called once, and inlined so that its state stays in registers.)
template <class T>
__device__ __forceinline__ void run_producer(Producer<T>& pr) {
  const TraceWriter<T> tr{pr.p};
  for_each_task(pr.p, [&](auto op, const Task& task, int u0, int u1) {
    if (u0 == u1) return true;
    if (tr.on()) tr.task(task, TraceField::kProduceStartNs, global_ns());
    const bool ok = decltype(op)::produce(pr, task, u0, u1);
    if (tr.on()) {
      tr.task(task, TraceField::kProduceEndNs, global_ns());
      tr.task(task, TraceField::kSlotWaitCycles, pr.slot_wait);
      tr.task(task, TraceField::kLandWaitCycles, pr.land_wait);
      pr.slot_wait = pr.land_wait = 0;
    }
    return ok;
  });
}

// (Called once, and inlined: as a function of its own, c went to local memory.)
template <class T>
__device__ __forceinline__ void run_consumers(Consumer<T>& c) {
  const MegakernelParams& p = c.p;
  const TraceWriter<T> tr{p};
  if (c.tid == 0 && tr.on()) tr.header(TraceHeader::kStartNs, global_ns()), tr.header(TraceHeader::kStartCycles, clock64());
  for_each_task(p, [&](auto op, const Task& task, int u0, int u1) {
    using Op = decltype(op);
    if (u0 == u1) return true;  // nothing to do, nothing to wait for
    if (c.tid == 0 && tr.on()) tr.task(task, TraceField::kTaskStartNs, global_ns());
    if (Op::kWaits && !variant_on<T>(p, kSkipWaits)) {
      // the task before this one (ops.hpp)
      if (c.tid == 0) c.flags[0] = !wait_counter(c.counter(task.index - 1), c.target(task.prev_op), p, task.index);
      c.sync();  // the wait's outcome (and, through thread 0's acquire, the inputs) for everyone
      if (c.flags[0]) return false;
    }
    if (c.tid == 0 && tr.on()) tr.task(task, TraceField::kReadyNs, global_ns());
    if (!Op::consume(c, task, u0, u1)) return false;
    if (c.tid == 0 && tr.on()) {
      tr.task(task, TraceField::kComputedNs, global_ns());
      tr.task(task, TraceField::kDataWaitCycles, c.data_wait);
      c.data_wait = 0;
    }
    if constexpr (Op::kSignal == Signal::kEveryCta) {
      c.sync();  // this CTA's outputs of the op are written
      if (c.tid == 0 && tr.on()) tr.task(task, TraceField::kSyncedNs, global_ns());
      if (c.tid == 0 && !signal_skipped<T>(p, task)) publish<T>(c.counter(task.index), p);
    }
    if (c.tid == 0 && tr.on()) {
      const unsigned long long now = global_ns();
      if (Op::kSignal == Signal::kItself) tr.task(task, TraceField::kSyncedNs, now);  // its own barrier and signal are inside
      tr.task(task, TraceField::kSignalledNs, now);
    }
    return true;
  });
  if (c.tid == 0 && tr.on()) tr.header(TraceHeader::kEndNs, global_ns()), tr.header(TraceHeader::kEndCycles, clock64());
  c.sync();  // every consumer thread is out of the task loop (an aborted step leaves it together too)
  if (c.tid == 0) publish_status(p);
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) megakernel(const __grid_constant__ MegakernelParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const SmemRegions regions(smem, p);  // misc | ring | union | reduce: see smem_split()

  if (threadIdx.x == 0) regions.ring<T>(p).init(), load_step_shape(p, *regions.shape);
  __syncthreads();  // barriers initialized and the step's shape loaded before any role touches them

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (warp_role(warp) != WarpRole::kConsumer) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegisters));  // the whole warpgroup
    if (warp_role(warp) == WarpRole::kProducer && lane == 0) {
      Producer<T> pr(p, regions);
      run_producer(pr);
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegisters));
  Consumer<T> c(p, regions, int(threadIdx.x));
  run_consumers(c);
}

}  // namespace flashformer
