// Warp roles, named barriers and the shared-memory plan of the megakernel. Host-visible (no
// CUDA) so the schedule tests can check that every config's plan fits.
#pragma once

#include <algorithm>

#include "flashformer/model_traits.hpp"

namespace flashformer {

inline constexpr int kWarpSize = 32;
inline constexpr int kWarpGroupWarps = 4;  // setmaxnreg works on warpgroups
inline constexpr int kConsumerWarps = 8;   // two warpgroups
inline constexpr int kConsumerThreads = kConsumerWarps * kWarpSize;
// + a third warpgroup for the producer, of which one warp works. Registers are split per SM
// sub-partition, so with 9 warps one sub-partition holds 3 and every thread was capped at 168
// registers; a whole warpgroup can hand its registers to the consumers (setmaxnreg).
inline constexpr int kThreads = (kConsumerWarps + kWarpGroupWarps) * kWarpSize;
inline constexpr int kProducerWarp = kConsumerWarps;

// Registers per thread after the split (setmaxnreg: multiples of 8 in 24..256, within the 64 K
// of the SM); at launch every thread has 65536 / kThreads, rounded down to a multiple of 8.
inline constexpr int kProducerRegisters = 56;
inline constexpr int kConsumerRegisters = 224;
static_assert(kWarpGroupWarps * kWarpSize * kProducerRegisters + kConsumerThreads * kConsumerRegisters <= 65536,
              "the register split exceeds the register file");
static_assert(kProducerRegisters <= 65536 / kThreads / 8 * 8 && kConsumerRegisters >= 65536 / kThreads / 8 * 8,
              "setmaxnreg lowers the producer's warpgroup and raises the consumers' from the launch count");

// Warps [0, kConsumerWarps) compute; warp kProducerWarp streams weights, and the rest of its
// warpgroup only gives its registers away.
enum class WarpRole : int { kConsumer, kProducer, kIdle };
constexpr WarpRole warp_role(int warp) {
  return warp < kConsumerWarps ? WarpRole::kConsumer : warp == kProducerWarp ? WarpRole::kProducer : WarpRole::kIdle;
}

// Named barrier ids (0 is __syncthreads). Only consumer warps take part in kConsumers.
enum class NamedBarrier : int { kConsumers = 1 };

inline constexpr int kSmemLimit = 227 * 1024;   // per CTA on sm_90 after opting in: static + dynamic
inline constexpr int kStaticSmemReserve = 1024; // static shared memory the kernel may declare (checked at launch setup)
inline constexpr int kStageBytes = 16 * 1024;   // one weight ring stage: 32 fragments of 16x16
inline constexpr int kMaxStages = 16;
inline constexpr int kMinStages = 4;  // enough to hide a dependency (the plan's floor, and ring_stages_limit's)
inline constexpr int kFragmentBytes = kRowBlock * kKBlock * 2;  // 512: one 16x16 bf16 fragment (or 16x32 e4m3)
inline constexpr int kFragmentsPerStage = kStageBytes / kFragmentBytes;

// How matrices are stored (fragment_layout.hpp): bf16 in fragments of 16 rows x 16 columns, or
// e4m3 in fragments of 16 x 32 with one fp32 scale per output row (per channel). An FP8 kernel
// (KernelTraits' kWeights) streams its layers' matrices in e4m3 and its LM head in either format.
enum class WeightFormat : int { kBf16 = 0, kFp8 = 1 };
inline constexpr int kNumWeightFormats = 2;
constexpr int weight_bytes(WeightFormat f) { return f == WeightFormat::kFp8 ? 1 : 2; }
// Activation k blocks (16 columns) one weight fragment spans.
constexpr int fragment_kblocks(WeightFormat f) { return f == WeightFormat::kFp8 ? 2 : 1; }
// The formats of one engine's matrices: its layers' and its LM head's.
struct WeightFormats {
  WeightFormat layers = WeightFormat::kBf16;
  WeightFormat lm_head = WeightFormat::kBf16;
};

// The KV cache a kernel reads (KernelTraits' kKv): bf16, or e4m3 with an fp32 scale per token and kv
// head (MegakernelParams::kv_scale). A compile-time choice, as the weights' format: with both
// attention variants in one kernel the FP8-weight kernels spilled.
enum class KvFormat : int { kBf16 = 0, kFp8 = 1 };
inline constexpr int kNumKvFormats = 2;

// Row orders applied while packing weights (weight_layout.cuh), so each epilogue finds related rows in one thread:
// rows g and g+8 of a 16-row block land in the same lane's accumulators.
enum class RowOrder : int {
  kIdentity = 0,
  kRopePairs = 1,  // per head of head_dim rows: block j holds dims 8j..8j+7 and D/2+8j..D/2+8j+7
  kGateUp = 2,     // [gate; up] stacked: block j holds gate rows 8j..8j+7 then up rows 8j..8j+7
};

// Row-positions per attention unit below which splitting a context across more SMs costs more
// (in the cross-SM merge) than it saves: one row's chunk is at least this / batch positions (and
// 16). The default of MegakernelEngine::attn_min_work, a tuning knob (benchmarks/NOTES.md).
inline constexpr int kDefaultAttnMinWork = 256;

// Floats per attention partial (o[head_dim], m, l, two pad): a multiple of 4, so the chunk
// merge reads o as float4.
constexpr int attn_part_stride(int head_dim) { return head_dim + 4; }
// Positions attention scores at a time (one pass through a warp's scoring scratch): a bf16 KV
// stage's, whose first half holds their keys and second half their values.
constexpr int attn_score_positions(int head_dim) { return kStageBytes / 2 / (head_dim * 2); }
// Bytes of n FP8 KV scales as a stage holds them: copied from the 16-byte boundary at or below the
// first (up to 3 scales before it), in whole 16-byte units.
constexpr int attn_fp8_scale_bytes(int n) { return (n + 3 + 3) / 4 * 16; }
// Where a half of an FP8 KV stage holds its scales: after its positions' D-byte rows, 16-byte aligned.
constexpr int attn_fp8_scale_offset(int head_dim, int positions) { return (positions * head_dim + 15) / 16 * 16; }
// Positions an FP8 KV stage's half has room for with their scales: a multiple of 8 (whole score
// tiles), so that a stage carries as many bytes as a bf16 one.
constexpr int attn_fp8_stage_room(int head_dim) {
  int n = kStageBytes / 2 / head_dim / 8 * 8;
  while (attn_fp8_scale_offset(head_dim, n) + attn_fp8_scale_bytes(n) > kStageBytes / 2) n -= 8;
  return n;
}
static_assert(attn_fp8_stage_room(128) == 56 && attn_fp8_stage_room(64) == 120,
              "an FP8 KV stage of head_dim 128 has room for 56 positions, of 64 for 120 (bf16: 32, 64)");
// q heads of a kv head rounded up to a power of two: the stride of the scoring weights.
constexpr int attn_head_slots(int group) { return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8; }
// Floats of one consumer warp's attention slot in shared memory: its partials (o, m, l) of the
// group's q heads, also its scoring scratch before that (a stage's rescale factors, then its
// weights [stage positions][head slots]); a multiple of 4 (float4 loads).
constexpr int attn_warp_floats(const ModelDims& d) {
  const int group = d.heads / d.kv_heads;
  const int scoring = attn_head_slots(group) * (1 + attn_score_positions(d.head_dim));
  return (std::max(group * attn_part_stride(d.head_dim), scoring) + 3) / 4 * 4;
}
// Positions of one batch row in a KV stage of attention, all scored in one pass: bf16, their keys
// and then (from the stage's middle) their values; e4m3 the same, each half's rows followed by
// their scales, as many as the half has room for and the warp's slot holds the weights of (whole
// score tiles). At head_dim 128 that is 56 (bf16: 32): the slot's partials leave room. At 64 the
// slot holds 64 (bf16's): 120 in two passes made batch 1 slower at short contexts (NOTES).
constexpr int attn_stage_positions(const ModelDims& d, KvFormat kv) {
  if (kv == KvFormat::kBf16) return attn_score_positions(d.head_dim);
  const int room = (attn_warp_floats(d) / attn_head_slots(d.heads / d.kv_heads) - 1) / 8 * 8;
  return std::min(attn_fp8_stage_room(d.head_dim), room);
}

inline constexpr int kReduceBytes = 2 * kConsumerWarps * kWarpSize * 4 * 4;  // 16x8 fp32 tile per warp, x2
// The misc region, byte offsets: the ring's mbarriers (full[kMaxStages], empty[kMaxStages]),
// two int flags, rinv[kMaxBatch] (float), kv_ends[2][kMaxBatch] (int: the consumers', the producer's),
// the StepShape.
inline constexpr int kMiscBytes = 1024;
inline constexpr int kMiscFlags = 2 * kMaxStages * 8;
inline constexpr int kMiscRinv = kMiscFlags + 2 * 4;
inline constexpr int kMiscKvEnds = kMiscRinv + kMaxBatch * 4;
inline constexpr int kMiscShape = kMiscKvEnds + 2 * kMaxBatch * 4;

// What tasks read about the step's rows, copied into the misc region once per step by the
// kernel's prologue (load_step_shape) rather than from global memory by every attention task
// and qkv epilogue.
struct StepShape {
  int positions[kMaxBatch];  // each row's position (KV slot) this step
  int context;               // the longest context (positions are 0-based)
  int active_chunks;         // attention chunks holding positions (at most attn_chunks)
  int chunk_len;             // positions per attention chunk
};
static_assert(kMiscShape + int(sizeof(StepShape)) <= kMiscBytes, "the misc region holds its fields");

// Shared memory of one step, laid out as
//   misc (kMiscBytes) | ring (stages x kStageBytes) | union (union_bytes) | reduce (kReduceBytes).
// The union holds, one at a time: the normalized activations of the batch rows [batch][hidden],
// a staged global activation [batch][K] (O and down projections, when it fits) and the
// attention merge scratch. It is sized for the batch, so a small batch gets a deeper ring.
struct SmemSplit {
  int union_bytes;
  int stages;
  int total_bytes;
};

constexpr SmemSplit smem_split(const ModelDims& d, int batch) {
  const int attn = kConsumerWarps * attn_warp_floats(d) * 4;
  const int act_max = kMaxBatch * d.hidden * 2;  // the normalized input at the largest batch
  const int widest = std::max(d.hidden, std::max(d.intermediate, d.q_rows()));
  const int want = std::max(attn, std::min(act_max, batch * widest * 2));
  const int union_bytes = (want + 1023) / 1024 * 1024;
  const int dynamic_limit = kSmemLimit - kStaticSmemReserve;
  const int stages = std::min(kMaxStages, (dynamic_limit - kMiscBytes - union_bytes - kReduceBytes) / kStageBytes);
  return {union_bytes, stages, kMiscBytes + stages * kStageBytes + union_bytes + kReduceBytes};
}

// Compile-time checks of every batch size of config T.
template <class T>
struct SmemPlan {
  static constexpr SmemSplit kLargestBatch = smem_split(T::kDims, kMaxBatch);
  static_assert(kLargestBatch.stages >= kMinStages, "the weight ring needs at least kMinStages stages to hide a dependency");
  static_assert(kLargestBatch.total_bytes <= kSmemLimit - kStaticSmemReserve, "shared memory plan exceeds 227 KB");
  static_assert(kMaxBatch * T::kHidden * 2 <= kLargestBatch.union_bytes, "normalized activations must fit");
};

// Two builds of every config's kernel, each in both weight formats: the shipped one, and one for measurement that also
// holds the timing variants, the step trace and the test hooks (MegakernelParams::instr). The
// shipped kernel compiles every one of their branches away (kInstrumented is a constant).
enum class Build : int { kShipped = 0, kInstrumented = 1 };

template <int Config, Build B, WeightFormat F = WeightFormat::kBf16, KvFormat K = KvFormat::kBf16>
struct KernelTraits : ModelTraits<Config> {
  using Base = ModelTraits<Config>;
  static constexpr bool kInstrumented = B == Build::kInstrumented;
  static constexpr WeightFormat kWeights = F;  // the layers' matrices (the LM head: MegakernelParams::lm_head)
  static constexpr KvFormat kKv = K;
  static_assert(F == WeightFormat::kBf16 ||
                    (Base::kHidden % 32 == 0 && Base::kQRows % 32 == 0 && Base::kIntermediate % 32 == 0),
                "e4m3 fragments span 32 columns: every matmul's K must be a multiple of 32");
};

}  // namespace flashformer
