// Warp roles, named barriers and the shared-memory plan of the megakernel. Host-visible (no
// CUDA) so the schedule tests can check that every config's plan fits.
#pragma once

#include <algorithm>

#include "flashformer/model_traits.hpp"

namespace flashformer {

inline constexpr int kWarpSize = 32;
inline constexpr int kConsumerWarps = 8;
inline constexpr int kConsumerThreads = kConsumerWarps * kWarpSize;
inline constexpr int kThreads = kConsumerThreads + kWarpSize;  // + one producer warp

// Warps [0, kConsumerWarps) compute; the last warp streams weights.
enum class WarpRole : int { kConsumer, kProducer };
constexpr WarpRole warp_role(int warp) { return warp < kConsumerWarps ? WarpRole::kConsumer : WarpRole::kProducer; }

// Named barrier ids (0 is __syncthreads). Only consumer warps take part in kConsumers.
enum class NamedBarrier : int { kConsumers = 1 };

inline constexpr int kSmemLimit = 227 * 1024;   // per CTA on sm_90 after opting in
inline constexpr int kStageBytes = 16 * 1024;   // one weight ring stage: 32 fragments of 16x16
inline constexpr int kMaxStages = 16;
inline constexpr int kFragmentBytes = kRowBlock * kKBlock * 2;  // 512: one 16x16 bf16 fragment
inline constexpr int kFragmentsPerStage = kStageBytes / kFragmentBytes;

// Row orders applied while packing weights (weight_layout.cuh), so each epilogue finds related rows in one thread:
// rows g and g+8 of a 16-row block land in the same lane's accumulators.
enum class RowOrder : int {
  kIdentity = 0,
  kRopePairs = 1,  // per head of head_dim rows: block j holds dims 8j..8j+7 and D/2+8j..D/2+8j+7
  kGateUp = 2,     // [gate; up] stacked: block j holds gate rows 8j..8j+7 then up rows 8j..8j+7
};

template <class T>
struct SmemPlan {
  // bf16 normalized activations [kMaxBatch][hidden] in fragment order (qkv, gate_up, lm_head)
  static constexpr int kActBytes = kMaxBatch * T::kHidden * 2;
  // attention: per consumer warp and q head of the group, o[head_dim] + (m, l) in fp32
  static constexpr int kAttnBytes = kConsumerWarps * T::kGroup * (T::kHeadDim + 2) * 4;
  static constexpr int kUnionBytes = std::max(kActBytes, kAttnBytes);
  // cross-warp reduction of one 16x8 fp32 accumulator tile per consumer warp, two buffers
  static constexpr int kReduceBytes = 2 * kConsumerWarps * kWarpSize * 4 * 4;  // double-buffered
  static constexpr int kMiscBytes = 1024;  // mbarriers, per-batch scalars
  static constexpr int kStages =
      std::min(kMaxStages, (kSmemLimit - kUnionBytes - kReduceBytes - kMiscBytes) / kStageBytes);
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kTotalBytes = kRingBytes + kUnionBytes + kReduceBytes + kMiscBytes;
  static_assert(kStages >= 4, "the weight ring needs at least 4 stages to hide a dependency");
  static_assert(kTotalBytes <= kSmemLimit, "shared memory plan exceeds 227 KB");
};

}  // namespace flashformer
