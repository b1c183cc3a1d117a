// Flag-in-data hand-offs. Values that other SMs read later in the step (the residual stream and
// the sums of squares the RMSNorms use) travel as 8-byte words: a 32-bit payload and the tag of
// the write that produced it (its step and op). A reader polls the words themselves until each
// carries the tag it expects, so a hand-off needs no release fence on the writer's side, no
// counter and no separate data read on the reader's: one 8-byte store is seen whole or not at all.
#pragma once

#include <cstdint>

#include "flashformer/megakernel_params.hpp"
#include "flashformer/sync.cuh"

namespace flashformer {

// The tag of what `op` of `layer` writes in this step (never 0: zeroed words are never current).
__device__ __forceinline__ uint32_t write_tag(const MegakernelParams& p, Op op, int layer) {
  return p.epoch * tags_per_step(p.n_layers) + uint32_t(layer * kNumOps + int(op));
}

__device__ __forceinline__ uint64_t tagged(float v, uint32_t tag) {
  return (uint64_t(tag) << 32) | __float_as_uint(v);
}
__device__ __forceinline__ uint32_t tag_of(uint64_t w) { return uint32_t(w >> 32); }
__device__ __forceinline__ float value_of(uint64_t w) { return __uint_as_float(uint32_t(w)); }

// Relaxed at GPU scope: the access goes to L2 (never a stale L1 line), and each 8-byte word is
// single-copy atomic, so its payload and tag are always from the same write.
__device__ __forceinline__ void store_tagged(uint64_t* dst, uint64_t w) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(dst), "l"(w) : "memory");
}
__device__ __forceinline__ uint64_t load_tagged(const uint64_t* src) {
  uint64_t w;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(w) : "l"(src));
  return w;
}
// Two words at a 16-byte boundary in one load (each word still atomic on its own).
__device__ __forceinline__ ulonglong2 load_tagged2(const uint64_t* src) {
  ulonglong2 w;
  asm volatile("ld.relaxed.gpu.global.v2.b64 {%0, %1}, [%2];" : "=l"(w.x), "=l"(w.y) : "l"(src));
  return w;
}

// Spins until ready() (which reloads whatever it checks) holds. Gives up when the step aborts
// or, after p.timeout_ns, raises a dependency timeout for (op, layer); the caller carries on
// either way (its outputs are then discarded, and the next wait anywhere sees the abort), so no
// thread leaves its CTA's barriers behind. Under kSkipWaits it loads once and does not wait.
template <class Ready>
__device__ __forceinline__ void poll_tagged(Ready&& ready, const MegakernelParams& p, Op op, int layer) {
  if (ready() || (p.timing_variant & kSkipWaits)) return;
  const uint64_t start = global_ns();
  for (unsigned spins = 1; !ready(); ++spins)
    if ((spins & 63) == 0) {
      if (step_aborted(p.scratch)) return;
      if (global_ns() - start > p.timeout_ns) {
        raise_error(p.scratch, StepError::kDependencyTimeout, int(op), layer);
        return;
      }
    }
}

}  // namespace flashformer
