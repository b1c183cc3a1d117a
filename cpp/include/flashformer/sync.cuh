// Inter-CTA dependencies: epoch-based counters in global memory, release on signal, acquire on
// wait, and a bounded spin that turns a missing signal into an error flag instead of a hang.
#pragma once

#include <cstdint>

#include "flashformer/megakernel_params.hpp"

namespace flashformer {

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ int load_relaxed(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Whether timing variant `flags` is on. Always false in the shipped build (T::kInstrumented is
// false), so the branch it guards compiles away there.
template <class T>
__device__ __forceinline__ bool variant_on(const MegakernelParams& p, int flags) {
  if constexpr (T::kInstrumented)
    return (p.instr.timing_variant & flags) != 0;
  else
    return false;
}

__device__ __forceinline__ bool step_aborted(const Scratch& s) { return load_relaxed(s.error) != 0; }

// First caller wins; the rest of the grid notices through step_aborted(). `task`: the task that
// found the problem; `detail`: what StepError says it is.
__device__ __forceinline__ void raise_error(const Scratch& s, StepError code, int task, int detail) {
  if (atomicCAS(s.error, 0, int(code)) == 0) {
    s.error[1] = task;
    s.error[2] = detail;
    s.error[3] = int(blockIdx.x);
    __threadfence();
  }
}

// Failed tries of a barrier between two looks at the abort flag (a global load). Looking on every
// try measured no slower (try_wait suspends in hardware until the phase completes, so the slow
// path is rare: benchmarks/NOTES.md); this keeps the loads off the common path anyway.
inline constexpr unsigned kAbortPollSpins = 32;

// Spin until ready() (an mbarrier try_wait, which itself suspends the thread for a while),
// looking at the abort flag every kAbortPollSpins failed tries; the cycles spent are added to
// `waited`. False when the step aborted.
template <class T, class Ready>
__device__ __forceinline__ bool spin_until(Ready&& ready, const MegakernelParams& p, long long& waited) {
  const long long t0 = clock64();
  const unsigned poll_mask = variant_on<T>(p, kPollEverySpin) ? 0u : kAbortPollSpins - 1;
  bool ok = true;
  for (unsigned spins = 0; !ready(); ++spins)
    if ((spins & poll_mask) == poll_mask && step_aborted(p.scratch)) {
      ok = false;
      break;
    }
  waited += clock64() - t0;
  return ok;
}

// fence.acq_rel at GPU scope: lighter than __threadfence() (fence.sc), and all a release or an
// acquire pattern needs.
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// System scope (tensor parallelism's hand-offs between GPUs, residual.cuh): the loads and fences
// order peer memory too (another GPU's writes over NVLink).
__device__ __forceinline__ unsigned load_acquire_sys(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_release_sys(unsigned* p, unsigned v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// One thread: spin until load(word) reaches target (wrap-safe; load acquires, so the writer's
// writes before it are visible). False when the step is aborted: by this wait outlasting the
// watchdog over kShare (it raises `code` with `task` and `detail`) or by another SM.
template <int kShare, class Load>
__device__ __forceinline__ bool wait_word(Load load, const unsigned* word, unsigned target, const MegakernelParams& p,
                                          StepError code, int task, int detail) {
  const uint64_t start = global_ns();
  for (unsigned spins = 0;; ++spins) {
    if (int(load(word) - target) >= 0) return true;
    if ((spins & 63) == 63) {
      if (step_aborted(p.scratch)) return false;
      if (global_ns() - start > p.timeout_ns / kShare) {
        raise_error(p.scratch, code, task, detail);
        return false;
      }
    }
  }
}

// One thread: wait for *counter (this GPU's) to reach target, within the watchdog. (Polling with
// ld.acquire measured ~1% faster than relaxed polls and one fence after: benchmarks/NOTES.md.)
__device__ __forceinline__ bool wait_counter(const unsigned* counter, unsigned target, const MegakernelParams& p,
                                             int task) {
  return wait_word<1>(load_acquire, counter, target, p, StepError::kDependencyTimeout, task, int(blockIdx.x));
}

// One thread: wait for *ready (a word rank `peer` writes) to reach target; a lost rank thus fails
// every rank's step instead of hanging it. Within half the watchdog (kPeerTimeoutShare), so that a
// lost rank's error is this wait's, and not that of a wait for the task whose exchange this is
// (they start within microseconds of each other).
__device__ __forceinline__ bool wait_peer(const unsigned* ready, unsigned target, const MegakernelParams& p, int task,
                                          int peer) {
  return wait_word<kPeerTimeoutShare>(load_acquire_sys, ready, target, p, StepError::kPeerTimeout, task, peer);
}

// One thread, after a barrier that ordered its CTA's output writes before it: publish them
// (the fence is cumulative over the writes the barrier ordered before it). Returns the old value.
__device__ __forceinline__ unsigned signal_counter(unsigned* counter) {
  fence_acq_rel_gpu();
  return atomicAdd(counter, 1u);
}

// One thread a CTA, once every consumer thread of its CTA is out of the step (a finished or an
// aborted one): count the CTA out; the last CTA out writes the step's outcome, its error words and
// arg-max tokens, to host_status's half for this epoch, so the host needs no copies of its own.
__device__ __forceinline__ void publish_status(const MegakernelParams& p) {
  if (signal_counter(p.scratch.exits) + 1 != p.epoch * gridDim.x) return;
  fence_acq_rel_gpu();  // every CTA's writes before its count (the error words, the tokens) are visible
  int* out = p.host_status + (p.epoch & 1) * kStatusWords;
  for (int i = 0; i < kErrorWords; ++i) out[i] = load_relaxed(p.scratch.error + i);
  for (int b = 0; b < p.batch; ++b) out[kErrorWords + b] = __ldcg(p.next_tokens + b);
}

// The same publication when nobody needs the old value: a release reduction, so the thread
// does not wait for the counter's round trip. (Under the timing variant kRelaxedSignals, without
// the release ordering: what the fence costs a hand-off.)
template <class T>
__device__ __forceinline__ void publish(unsigned* counter, const MegakernelParams& p) {
  if (variant_on<T>(p, kRelaxedSignals))
    asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
  else
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
}

}  // namespace flashformer
