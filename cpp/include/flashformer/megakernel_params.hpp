// Everything one decode-step launch reads: device pointers (owned by Python) and run-time
// sizes. Host-visible, so the engine fills it without CUDA device code.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "flashformer/schedule.hpp"
#include "flashformer/trace.hpp"

namespace flashformer {

using bf16_t = __nv_bfloat16;

// Matmul weights are in fragment order (weight_layout.cuh), norms plain [hidden].
struct LayerWeights {
  const bf16_t* qkv;       // [q|k|v rows, hidden], RoPE pairs adjacent in each 16-row block
  const bf16_t* o;         // [hidden, heads * head_dim]
  const bf16_t* gate_up;   // [2 * intermediate, hidden], 8 gate rows then their 8 up rows
  const bf16_t* down;      // [hidden, intermediate]
  const bf16_t* attn_norm; // [hidden]
  const bf16_t* mlp_norm;  // [hidden]
};

// Timing variants for differential measurement (benchmarks/NOTES.md): each flag leaves one
// part of the step out. Outputs are garbage with any flag set; never set outside measurement.
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

// L2 eviction priority of the weight stream's bulk copies. Weights are read once per step;
// evict-first keeps them from pushing out what the step reads again (activations, the residual
// stream, the KV cache of the current token).
enum class WeightL2Policy : int { kNormal = 0, kEvictFirst = 1 };

// Why a step stopped early (written once, by the first SM that gave up).
enum class StepError : int { kNone = 0, kDependencyTimeout = 1 };
inline constexpr int kErrorWords = 4;  // Scratch::error: StepError, op, layer, SM

// Engine-owned scratch carved from one Python-owned buffer (see scratch_layout in engine.cpp).
struct Scratch {
  float* x;                // [kMaxBatch][hidden] residual stream, fp32
  float* q;                // [kMaxBatch][heads][head_dim] roped, scaled by log2(e)/sqrt(head_dim)
  bf16_t* attn_frag;       // attention output as mma B fragments [q_rows/16][8][4][4]
  bf16_t* act_frag;        // silu(gate) * up as mma B fragments [intermediate/16][8][4][4]
  float* attn_part;        // [kMaxBatch][heads][chunks][attn_part_stride]: o, m, l per chunk
  float* argmax_part;      // [kMaxBatch][num_sms][2]: best logit and its index (as float bits)
  float* sq_part;          // [2 * layers + 1 norms][num_sms][kMaxBatch]: each SM's share of sum(x^2) of
                           // every RMSNorm's input, written by the op that wrote its rows of x
  unsigned* counters;      // [layers][kNumOps] op counters, then [layers][kv_heads] attention
  int* error;              // [kErrorWords]: StepError, op, layer, SM
};

struct MegakernelParams {
  const LayerWeights* layers;  // device array [n_layers]
  int n_layers;
  const bf16_t* embed;         // [vocab, hidden] row-major
  const bf16_t* final_norm;    // [hidden]
  const bf16_t* lm_head;       // [vocab, hidden] in fragment order
  const float* rope_cos;       // [max_seq, head_dim / 2]
  const float* rope_sin;       // [max_seq, head_dim / 2]
  float rms_eps;
  bf16_t* kv_cache;            // [n_layers][2][max_batch][kv_heads][max_seq][head_dim]
  int max_batch;
  int max_seq;
  int batch;                   // rows decoded this step, 1..kMaxBatch
  const int64_t* tokens;       // [batch] input token of each row (int64, as torch holds token ids)
  const int64_t* positions;    // [batch] position (KV slot) of that token
  int32_t* next_tokens;        // [batch] greedy (arg-max) next token
  float* logits;               // [batch][vocab] fp32, or nullptr
  Scratch scratch;
  const int* schedule;         // [n_layers][kNumOps][num_sms + 1] unit ranges (schedule.hpp)
  int op_signals[kNumOps];     // arrivals that complete an op in one step
  int attn_chunks;
  int ring_stages;             // smem_split(dims, batch): the shared-memory layout of this launch
  int union_bytes;
  int inflight_stages;         // most weight stages issued and not yet landed per SM (<= ring_stages)
  int weight_l2_policy;        // WeightL2Policy
  unsigned epoch;              // 1-based step count: counter targets are epoch * arrivals
  unsigned long long timeout_ns;  // a dependency wait longer than this aborts the step
  int debug_skip_signal;       // test hook: SM 0 never signals this op (-1: off)
  int timing_variant;          // TimingVariant flags; 0 in normal operation
  unsigned long long* trace;   // [num_sms][trace_words_per_sm] (trace.hpp), or nullptr: off
};

}  // namespace flashformer
