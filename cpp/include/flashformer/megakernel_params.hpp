// Everything one decode-step launch reads: device pointers (owned by Python) and run-time
// sizes. Host-visible, so the engine fills it without CUDA device code.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "flashformer/kernel_config.hpp"
#include "flashformer/op.hpp"

namespace flashformer {

using bf16_t = __nv_bfloat16;

// A matmul's weights in fragment order (fragment_layout.hpp), in its WeightFormat: bf16, or e4m3
// with `scale` (fp32, one per row in the packed row order: row r is data's row r times scale[r]).
struct Matrix {
  const void* data = nullptr;
  const float* scale = nullptr;  // null for bf16
};

// Matmul weights are Matrix, vectors plain bf16. A feature's fields (Feature, model_traits.hpp)
// are null in configs without it.
struct LayerWeights {
  Matrix qkv;              // [q|k|v rows, hidden], RoPE pairs adjacent in each 16-row block
  Matrix o;                // [hidden, heads * head_dim]
  Matrix gate_up;          // [2 * intermediate, hidden], 8 gate rows then their 8 up rows
  Matrix down;             // [hidden, intermediate]
  const bf16_t* attn_norm; // [hidden]
  const bf16_t* mlp_norm;  // [hidden]
  const bf16_t* qkv_bias;  // [q|k|v rows] in the checkpoint's row order (kQkvBias)
  const bf16_t* q_norm;    // [head_dim] (kQkNorm)
  const bf16_t* k_norm;    // [head_dim] (kQkNorm)
};

// How the engine fills LayerWeights: the field (a matrix, or a plain vector), and for a matrix the
// row order it is packed in (the epilogues rely on it) with that order's parameter for a config;
// `needs`: the feature whose configs have it (kPlain: every config).
struct LayerWeightField {
  const char* name;
  Matrix LayerWeights::*matrix;        // a matrix in fragment order, or null
  const bf16_t* LayerWeights::*vector; // a plain vector, or null
  RowOrder order = RowOrder::kIdentity;  // of a matrix
  Feature needs = kPlain;
  constexpr bool packed() const { return matrix != nullptr; }
  constexpr bool used_by(const ModelDims& d) const { return needs == kPlain || d.has(needs); }
};
inline constexpr LayerWeightField kLayerWeightFields[] = {
    {"qkv", &LayerWeights::qkv, nullptr, RowOrder::kRopePairs},
    {"o", &LayerWeights::o, nullptr, RowOrder::kIdentity},
    {"gate_up", &LayerWeights::gate_up, nullptr, RowOrder::kGateUp},
    {"down", &LayerWeights::down, nullptr, RowOrder::kIdentity},
    {"attn_norm", nullptr, &LayerWeights::attn_norm},
    {"mlp_norm", nullptr, &LayerWeights::mlp_norm},
    {"qkv_bias", nullptr, &LayerWeights::qkv_bias, RowOrder::kIdentity, kQkvBias},
    {"q_norm", nullptr, &LayerWeights::q_norm, RowOrder::kIdentity, kQkNorm},
    {"k_norm", nullptr, &LayerWeights::k_norm, RowOrder::kIdentity, kQkNorm},
};
// The parameter of a row order for a config (weight_layout.cuh's source_row).
constexpr int row_order_param(RowOrder order, const ModelDims& d) {
  return order == RowOrder::kRopePairs ? d.head_dim : order == RowOrder::kGateUp ? d.intermediate : 0;
}

// Timing variants for differential measurement (benchmarks/NOTES.md): each flag leaves one
// part of the step out. Outputs are garbage with any flag set. Only the instrumented build
// (Build::kInstrumented) looks at them.
enum TimingVariant : int {
  kTimeAll = 0,
  kSkipWaits = 1,       // consumers never wait on other SMs' counters
  kSkipAttention = 2,   // attention units only signal
  kSkipNorm = 4,        // RMSNorm prologues skipped (stale activations)
  kSkipEpilogue = 8,    // matmul epilogues skipped
  kSkipMath = 16,       // matmuls only wait for and release their weight stages (no loads, mma, reduction)
  kPollEverySpin = 32,  // barrier spins look at the abort flag on every failed try (the old behaviour)
  kSkipLoads = 64,      // the producer marks stages full without copying: consumers run at their own pace
  kSkipReduce = 128,    // matmuls skip the cross-warp reduction of each row block (and its barrier)
  kRelaxedSignals = 256,  // op signals without the release fence (readers may see stale inputs)
};

// What only the instrumented build reads (the shipped kernel ignores every field).
struct Instrumentation {
  int timing_variant = 0;            // TimingVariant flags
  int skip_signal_op = -1;           // test hook: SM 0 never signals this op (an index into StepOps; -1: off)
  unsigned long long* trace = nullptr;  // [num_sms][trace_words_per_sm] (trace.hpp), or nullptr: off
  bool any() const { return timing_variant != 0 || skip_signal_op >= 0 || trace != nullptr; }
};

// L2 eviction priority of the weight stream's bulk copies. Weights are read once per step;
// evict-first keeps them from pushing out what the step reads again (activations, the residual
// stream, the KV cache of the current token).
enum class WeightL2Policy : int { kNormal = 0, kEvictFirst = 1 };

// Why a step stopped early, or what it found wrong (written once, by the first SM to see it).
enum class StepError : int {
  kNone = 0,
  kDependencyTimeout = 1,  // detail: the SM that gave up waiting
  kNonFiniteLogits = 2,    // detail: the batch row
  kPeerTimeout = 3,        // detail: the tensor-parallel rank whose partial sums never came
};
// A wait for another rank gives up after the watchdog (timeout_ns) over this (sync.cuh's wait_peer).
inline constexpr int kPeerTimeoutShare = 2;
inline constexpr int kErrorWords = 4;  // Scratch::error: StepError, task, detail, SM
// Words of a step's outcome in MegakernelParams::host_status: its error words, then its arg-max tokens.
inline constexpr int kStatusWords = kErrorWords + kMaxBatch;

// Engine-owned scratch carved from one Python-owned buffer (see scratch_layout in megakernel_engine.cpp).
struct Scratch {
  float* x;                // [kMaxBatch][hidden] residual stream, fp32
  float* q;                // [kMaxBatch][heads][head_dim] roped, scaled by log2(e)/sqrt(head_dim)
                           // (kQkNorm: not yet by the head's RMSNorm scale, which attention applies)
  float* k_new;            // [2][kMaxBatch][kv_heads][head_dim] this step's k (roped; with kQkNorm normed
                           // but for the RMSNorm scale) and v, when attention appends them to the KV cache
                           // (kQkNorm: k; an FP8 KV cache: k and v, quantized there)
  float* qk_sq;            // kQkNorm: [kMaxBatch][heads + kv_heads][head_dim / 16] sums of squares
                           // of each head's 16-row blocks (the per-head RMSNorm's statistic)
  bf16_t* attn_frag;       // attention output as mma B fragments [q_rows/16][8][4][4]
  bf16_t* act_frag;        // silu(gate) * up as mma B fragments [intermediate/16][8][4][4]
  float* attn_part;        // [kMaxBatch][heads][chunks][attn_part_stride]: o, m, l per chunk
  float* argmax_part;      // [kMaxBatch][num_sms][2]: best logit and its index (as float bits; -1: non-finite seen)
  float* sq_part;          // [2 * layers + 1 norms][num_sms][kMaxBatch]: each SM's share of sum(x^2) of
                           // every RMSNorm's input, written by the op that wrote its rows of x
  unsigned* counters;      // [tasks]: one per task of the step (ops.hpp's task order)
  unsigned* attn_groups;   // [layers][kv_heads]: attention's last-chunk counters (after the task counters)
  unsigned* exits;         // CTAs out of the step (after attention's counters): the last one writes host_status
  int* error;              // [kErrorWords]: StepError, task, detail, SM
};

// Tensor parallelism (kWorld > 1, model_traits.hpp): the O and down projections' partial row
// blocks go to every rank, which sums them (residual.cuh). Each rank owns one exchange buffer,
// which every rank writes into through its peer mapping (CUDA IPC over NVLink, or the same GPU):
//   partial [kExchangeSets][world][hidden / 16][32 lanes] float4: rank src's 16x8 tile of a row
//           block of the O (set 0) or down (set 1) projection, in accumulator order (AccTile)
//   ready   [kExchangeSets][world][num_sms]: how many exchanges of the set rank src's SM s has
//           written (set s of layer l in step epoch e is exchange (e - 1) * layers + l + 1)
// All ranks run the same schedule, so SM s of every rank owns the same row blocks, and SM s waits
// only for the SMs s of the other ranks. The buffer starts zeroed, with the counters.
inline constexpr int kExchangeSets = 2;
constexpr int64_t exchange_partial_floats(const ModelDims& d) {
  return int64_t(kExchangeSets) * d.world * (d.hidden / kRowBlock) * kWarpSize * 4;
}
constexpr int64_t exchange_bytes(const ModelDims& d, int num_sms) {
  return exchange_partial_floats(d) * 4 + int64_t(kExchangeSets) * d.world * num_sms * 4;
}
struct TensorParallel {
  int rank = 0;
  float* partial[kMaxWorld] = {};    // rank q's exchange buffer as this rank reaches it (its own: local)
  unsigned* ready[kMaxWorld] = {};   // the ready words of that buffer (after its partials)
};

struct MegakernelParams {
  const LayerWeights* layers;  // device array [n_layers]
  int n_layers;
  const bf16_t* embed;         // [vocab, hidden]: row-major, or (embed_packed) the packed bf16 LM head
  bool embed_packed;           // tied embeddings: the table is the packed LM head itself
  const bf16_t* final_norm;    // [hidden]
  Matrix lm_head;              // [padded_vocab, hidden] (zero rows past vocab); e4m3 only in FP8 kernels
  const float* rope_cos;       // [max_seq, head_dim / 2]
  const float* rope_sin;       // [max_seq, head_dim / 2]
  float rms_eps;
  bf16_t* kv_cache;            // [n_layers][2][max_batch][kv_heads][max_seq][head_dim] bf16, or e4m3 bytes
  float* kv_scale;             // the FP8 KV cache's scales, [n_layers][2][max_batch][kv_heads][max_seq] fp32
                               // (a vector stands for its e4m3 values times its scale; 4 floats of padding
                               // after the last); null: a bf16 cache. The engine launches the kernel of
                               // that format (KernelTraits' kKv)
  int max_batch;
  int max_seq;
  int batch;                   // rows decoded this step, 1..kMaxBatch
  const int64_t* tokens;       // [batch] input token of each row (int64, as torch holds token ids)
  const int64_t* positions;    // [batch] position (KV slot) of that token
  int32_t* next_tokens;        // [batch] greedy (arg-max) next token
  float* logits;               // [batch][vocab] fp32, or nullptr
  int* host_status;            // mapped host memory [2][kStatusWords]: the step's outcome, in half epoch % 2,
                               // written by the last CTA out (the host reads it after the step's event)
  Scratch scratch;
  const int* schedule;         // [tasks][num_sms + 1] unit ranges (schedule.hpp)
  int arrivals[kMaxOps];       // counter arrivals that complete a task of each op (ops.hpp order), per step
  int attn_chunks;
  int attn_min_work;           // row-positions per attention unit before a context splits further (load_step_shape)
  int ring_stages;             // smem_split(dims, batch): the shared-memory layout of this launch
  int union_bytes;
  int inflight_stages;         // most weight stages issued and not yet landed per SM (<= ring_stages)
  int weight_l2_policy;        // WeightL2Policy
  unsigned epoch;              // 1-based step count: counter targets are epoch * arrivals
  unsigned long long timeout_ns;  // a dependency wait longer than this aborts the step
  Instrumentation instr;       // read by the instrumented build only
  TensorParallel tp;           // read by the kernels of shards (kWorld > 1) only
};

}  // namespace flashformer
