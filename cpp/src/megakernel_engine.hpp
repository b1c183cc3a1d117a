// Host side of the megakernel: the schedule, the scratch layout inside one Python-owned buffer,
// and the launch of one decode step.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "flashformer/megakernel_params.hpp"
#include "flashformer/schedule.hpp"
#include "flashformer/trace.hpp"
#include "kernels/configs.hpp"

namespace flashformer {

// Byte offsets of the scratch regions (256-byte aligned) and the total size.
struct ScratchLayout {
  int64_t x, q, k_new, qk_sq, attn_frag, act_frag, attn_part, argmax_part, sq_part, counters, attn_groups, exits, error, layer_table, schedule,
      total;
  int64_t counters_bytes;
};

// Device pointers the step reads and writes that are not per-step arguments.
struct ModelPointers {
  std::vector<LayerWeights> layers;
  const bf16_t* embed;
  bool embed_packed;  // tied: `embed` is the packed LM head (fragment order)
  const bf16_t* final_norm;
  Matrix lm_head;  // scale: null for a bf16 LM head
  const float* rope_cos;
  const float* rope_sin;
  bf16_t* kv_cache;
  float* kv_scale;  // null: a bf16 KV cache (MegakernelParams::kv_scale)
  float rms_eps;
};

class MegakernelEngine {
 public:
  // Throws std::invalid_argument for an unknown config, bad sizes, or an e4m3 LM head beside bf16
  // layers (an FP8 kernel reads either LM head, a bf16 kernel only a bf16 one).
  // `sm_count` > 0: run on that many SMs at most (two ranks of a shard sharing one GPU); 0: all.
  MegakernelEngine(const std::string& config, int device, int n_layers, int max_batch, int max_seq,
                   WeightFormats formats = {}, int sm_count = 0);
  ~MegakernelEngine();
  MegakernelEngine(const MegakernelEngine&) = delete;
  MegakernelEngine& operator=(const MegakernelEngine&) = delete;

  const CompiledConfig& config() const { return *config_; }
  const WeightFormats& formats() const { return formats_; }
  const Schedule& schedule() const { return schedule_; }
  int64_t scratch_bytes() const { return layout_.total; }
  // A tensor-parallel shard's exchange buffer (megakernel_params.hpp's TensorParallel): the
  // bytes each rank allocates, zeroed, for this engine's SMs.
  int64_t exchange_bytes() const { return flashformer::exchange_bytes(config_->dims, num_sms_); }
  // A shard's place among its ranks: this engine is rank `rank`, and exchange[q] is rank q's
  // exchange buffer as this process reaches it (exchange[rank] its own). Every rank runs the same
  // steps (inputs, batch, epoch) in the same order; a step before this call throws.
  void set_tensor_parallel(int rank, const std::vector<void*>& exchange);

  // `scratch`: scratch_bytes() of zeroed device memory, owned by the caller for the engine's
  // lifetime. Writes the layer table and the schedule into it (synchronously).
  void bind(void* scratch, const ModelPointers& model);

  // Launches one decode step on `stream` (asynchronous): tokens/positions int64 [batch] on the
  // device; next_tokens int32 [batch]; logits fp32 [batch, vocab] or null.
  void step(const int64_t* tokens, const int64_t* positions, int32_t* next_tokens, float* logits, int batch,
            cudaStream_t stream);

  // Records, on `stream` after the last step, an event after its outcome (the error words and
  // arg-max tokens, which its kernel writes into mapped host memory), without waiting:
  // check_recorded() reads them.
  void record(cudaStream_t stream);
  // Waits for what record() queued (nothing to do when nothing is pending); if that step failed,
  // throws std::runtime_error saying why: a dependency that never completed (the counters are
  // reset first, so the next step runs clean) or a row whose logits were not finite.
  void check_recorded();
  // record(stream), then check_recorded(): waits for the last step on `stream`.
  void check(cudaStream_t stream) {
    record(stream);
    check_recorded();
  }

  // The arg-max tokens of the step the last successful check waited for (its batch rows).
  std::vector<int> checked_next_tokens() const {
    return std::vector<int>(checked_words_ + kErrorWords, checked_words_ + kErrorWords + checked_batch_);
  }

  double timeout_ms = 5000.0;  // a dependency wait longer than this aborts the step (a wait for another rank: half)
  // Timing variants, the step trace and test hooks: a step with any of them set runs the
  // instrumented build of the kernel (std::invalid_argument where this build has none).
  Instrumentation instr;
  int ring_stages_limit = 0;   // timing only: use at most this many ring stages (0: the plan's)
  // Tuning (benchmarks/NOTES.md has the sweeps that chose the defaults).
  int inflight_stages_limit = 3;  // most weight stages in flight per SM (0: the whole ring)
  int weight_l2_policy = int(WeightL2Policy::kEvictFirst);  // of the weight stream
  int attn_min_work = kDefaultAttnMinWork;  // attention: row-positions per unit before a context splits further
  // Size of the step trace (trace.hpp) for this engine's SMs and layers.
  int64_t trace_words() const { return int64_t(num_sms_) * trace_words_per_sm(schedule_.layers); }

 private:
  const CompiledConfig* config_;
  WeightFormats formats_;
  int device_, num_sms_, max_batch_, max_seq_;
  Schedule schedule_;
  ScratchLayout layout_;
  MegakernelParams params_{};
  uint8_t* scratch_ = nullptr;
  void* exchange_ = nullptr;   // a shard's own exchange buffer (set_tensor_parallel)
  int* host_words_ = nullptr;  // mapped pinned [2][kStatusWords]: a step's outcome in half epoch % 2 (publish_status)
  const int* recorded_words_ = nullptr;  // the half of the step record() waits for
  const int* checked_words_ = nullptr;   // the half the last successful check read
  int checked_batch_ = 0;      // rows of arg-max tokens in checked_words_ (0: none valid)
  int recorded_batch_ = -1;    // rows of arg-max tokens record() queued (-1: nothing pending)
  cudaEvent_t recorded_ = nullptr;  // after the recorded step
  cudaStream_t recorded_stream_ = nullptr;  // where they were queued (an abort's reset goes there too)
  unsigned epoch_ = 0;
  bool instrumented_prepared_[kNumKvFormats] = {false, false};
};

}  // namespace flashformer
