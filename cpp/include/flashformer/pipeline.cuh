// The weight ring: `stages` shared-memory stages filled by 1-D TMA bulk copies from the producer
// warp and drained by the consumer warps, each stage guarded by a full and an empty mbarrier.
// Weights never depend on activations, so the producer runs ahead across op and layer
// boundaries, bounded only by the ring.
#pragma once

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "flashformer/kernel_config.hpp"
#include "flashformer/sync.cuh"

namespace flashformer {

// Position in the ring and the phase parity of its current pass.
struct RingCursor {
  int stage = 0;
  uint32_t phase = 0;
  __device__ void advance(int stages) {
    if (++stage == stages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

template <class T>  // the kernel's traits: its build decides whether timing variants exist
struct WeightRing {
  using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;

  uint8_t* data;    // stages x kStageBytes
  uint64_t* full;   // [stages]: producer arrival + transaction bytes
  uint64_t* empty;  // [stages]: one arrival per consumer warp
  int stages;       // smem_split(): deeper for small batches

  __device__ void init() const {  // one thread, before the CTA-wide barrier
    for (int s = 0; s < stages; ++s) {
      FullBarrier::init(&full[s], 1);
      EmptyBarrier::init(&empty[s], kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();  // inits visible to the async proxy before any TMA
  }

  __device__ const uint4* stage(int s) const { return reinterpret_cast<const uint4*>(data + s * kStageBytes); }

  // Producer, one thread: copy `bytes` (multiple of 16) of weights from global into the next
  // stage; cycles spent waiting for the consumers to free it are added to `waited`. False when
  // the step was aborted meanwhile.
  __device__ bool push(RingCursor& c, const void* src, int bytes, const MegakernelParams& p, long long& waited) const {
    return fill(c, bytes, p, waited, [&](uint8_t* dst, uint64_t* bar) {
      if (p.weight_l2_policy == int(WeightL2Policy::kEvictFirst))
        bulk_copy_evict_first(src, bar, dst, bytes);
      else
        cute::SM90_BULK_COPY_G2S::copy(src, bar, dst, bytes);
    });
  }

  // The same for a KV-cache stage: `bytes` of keys into the stage's first half and as many of
  // values into its second (no L2 hint: the cache is read again next step).
  __device__ bool push_kv(RingCursor& c, const void* keys, const void* values, int bytes, const MegakernelParams& p,
                          long long& waited) const {
    return fill(c, 2 * bytes, p, waited, [&](uint8_t* dst, uint64_t* bar) {
      cute::SM90_BULK_COPY_G2S::copy(keys, bar, dst, bytes);
      cute::SM90_BULK_COPY_G2S::copy(values, bar, dst + kStageBytes / 2, bytes);
    });
  }

  // Producer: an FP8 KV stage: `bytes` of keys at the stage's start and of values from its middle,
  // each followed, scale_offset bytes into its half, by their scales (key_scale_bytes,
  // value_scale_bytes, scale_offset: multiples of 16).
  __device__ bool push_kv_fp8(RingCursor& c, const void* keys, const void* values, const float* key_scales,
                              int key_scale_bytes, const float* value_scales, int value_scale_bytes, int bytes,
                              int scale_offset, const MegakernelParams& p, long long& waited) const {
    return fill(c, 2 * bytes + key_scale_bytes + value_scale_bytes, p, waited, [&](uint8_t* dst, uint64_t* bar) {
      cute::SM90_BULK_COPY_G2S::copy(keys, bar, dst, bytes);
      cute::SM90_BULK_COPY_G2S::copy(key_scales, bar, dst + scale_offset, key_scale_bytes);
      cute::SM90_BULK_COPY_G2S::copy(values, bar, dst + kStageBytes / 2, bytes);
      cute::SM90_BULK_COPY_G2S::copy(value_scales, bar, dst + kStageBytes / 2 + scale_offset, value_scale_bytes);
    });
  }

  // Producer: wait until the stage at `c` is free, arm its full barrier for `bytes` (before any
  // copy can land), issue copy(stage data, full barrier) and move on. Under kSkipLoads the stage
  // "lands" at once with stale bytes and nothing is copied. False when the step was aborted.
  template <class Copy>
  __device__ bool fill(RingCursor& c, int bytes, const MegakernelParams& p, long long& waited, Copy&& copy) const {
    // Parity phase^1 of the empty barrier: the consumers' release of this stage's previous use
    // (the first pass finds the "previous" phase complete and does not wait).
    if (!spin_until<T>([&] { return EmptyBarrier::try_wait(&empty[c.stage], c.phase ^ 1); }, p, waited)) return false;
    if (variant_on<T>(p, kSkipLoads)) {
      FullBarrier::arrive(&full[c.stage]);
    } else {
      FullBarrier::arrive_and_expect_tx(&full[c.stage], bytes);
      copy(data + c.stage * kStageBytes, &full[c.stage]);
    }
    c.advance(stages);
    return true;
  }

  // Producer: wait until the stage at `c` has landed (it was pushed, and the producer re-arms a
  // stage only after passing it here, so its full barrier is at most one phase ahead).
  __device__ bool wait_landed(RingCursor& c, const MegakernelParams& p, long long& waited) const {
    if (!spin_until<T>([&] { return FullBarrier::try_wait(&full[c.stage], c.phase); }, p, waited)) return false;
    c.advance(stages);
    return true;
  }

  // cp.async.bulk global -> shared with an L2 evict-first hint (the data is read once per step).
  __device__ static void bulk_copy_evict_first(const void* src, uint64_t* bar, void* dst, int bytes) {
    const uint64_t policy = uint64_t(cute::TMA::CacheHintSm90::EVICT_FIRST);
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n"
        :
        : "r"(cute::cast_smem_ptr_to_uint(dst)), "l"(src), "r"(bytes), "r"(cute::cast_smem_ptr_to_uint(bar)), "l"(policy)
        : "memory");
  }

  // Consumer warp: wait until the stage's bytes have landed (cycles waited added to `waited`).
  // False when the step was aborted (the producer then stopped, so every consumer warp ends up
  // here on the same stage).
  __device__ bool wait_full(const RingCursor& c, const MegakernelParams& p, long long& waited) const {
    return spin_until<T>([&] { return FullBarrier::try_wait(&full[c.stage], c.phase); }, p, waited);
  }

  // Consumer warp: done reading the stage; its lane 0 frees it for the producer.
  __device__ void release(RingCursor& c) const {
    __syncwarp();  // every lane's shared-memory reads of the stage are done
    if (threadIdx.x % kWarpSize == 0) EmptyBarrier::arrive(&empty[c.stage]);
    c.advance(stages);
  }
};

}  // namespace flashformer
