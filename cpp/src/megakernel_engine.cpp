#include "megakernel_engine.hpp"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

#include "cuda_check.hpp"
#include "flashformer/kernel_config.hpp"

namespace flashformer {
namespace {

ScratchLayout scratch_layout(const ModelDims& d, const Schedule& s) {
  ScratchLayout l{};
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t off = at;
    at += (bytes + 255) / 256 * 256;
    return off;
  };
  l.x = take(int64_t(kMaxBatch) * d.hidden * 4);
  l.q = take(int64_t(kMaxBatch) * d.q_rows() * 4);
  const bool qk_norm = d.has(kQkNorm);  // (the scratch of a feature only where a config has it)
  l.k_new = take(2 * int64_t(kMaxBatch) * d.kv_rows() * 4);  // (any config may get an FP8 KV cache)
  l.qk_sq = take(qk_norm ? int64_t(kMaxBatch) * (d.heads + d.kv_heads) * (d.head_dim / kRowBlock) * 4 : 0);
  l.attn_frag = take(int64_t(kMaxBatch) * d.q_rows() * 2);
  l.act_frag = take(int64_t(kMaxBatch) * d.intermediate * 2);
  l.attn_part = take(int64_t(kMaxBatch) * d.heads * s.attn_chunks * attn_part_stride(d.head_dim) * 4);
  l.argmax_part = take(int64_t(kMaxBatch) * s.num_sms * 2 * 4);
  l.sq_part = take(int64_t(2 * s.layers + 1) * s.num_sms * kMaxBatch * 4);
  // the task counters, attention's per-kv-head group counters, the exit counter: one region,
  // zeroed together
  l.counters_bytes = (int64_t(s.tasks()) + int64_t(s.layers) * d.kv_heads + 1) * 4;
  l.counters = take(l.counters_bytes);
  l.attn_groups = l.counters + int64_t(s.tasks()) * 4;
  l.exits = l.attn_groups + int64_t(s.layers) * d.kv_heads * 4;
  l.error = take(kErrorWords * sizeof(int));
  l.layer_table = take(int64_t(s.layers) * sizeof(LayerWeights));
  l.schedule = take(int64_t(s.tasks()) * (s.num_sms + 1) * 4);
  l.total = at;
  return l;
}

const CompiledConfig& find_config(const std::string& name) {
  std::string names;
  for (const CompiledConfig& c : compiled_configs()) {
    if (name == config_label(c.dims)) return c;
    names += (names.empty() ? "" : ", ") + config_label(c.dims);
  }
  throw std::invalid_argument("no compiled megakernel config named '" + name + "' (compiled: " + names + ")");
}

}  // namespace

MegakernelEngine::MegakernelEngine(const std::string& config, int device, int n_layers, int max_batch, int max_seq,
                                   WeightFormats formats, int sm_count)
    : config_(&find_config(config)), formats_(formats), device_(device), max_batch_(max_batch), max_seq_(max_seq) {
  for (WeightFormat f : {formats.layers, formats.lm_head})
    if (f != WeightFormat::kBf16 && f != WeightFormat::kFp8)
      throw std::invalid_argument("megakernel: unknown weight format " + std::to_string(int(f)));
  if (formats.layers == WeightFormat::kBf16 && formats.lm_head == WeightFormat::kFp8)
    throw std::invalid_argument("megakernel: an e4m3 LM head needs e4m3 layers (only FP8 kernels read e4m3)");
  if (n_layers < 1) throw std::invalid_argument("megakernel: n_layers must be >= 1");
  if (max_batch < 1) throw std::invalid_argument("megakernel: max_batch must be >= 1");
  if (max_seq < 1) throw std::invalid_argument("megakernel: max_seq must be >= 1");
  if (sm_count < 0) throw std::invalid_argument("megakernel: sm_count must be >= 0 (0: every SM)");
  if (config_->dims.world > 1 && (formats.layers != WeightFormat::kBf16 || formats.lm_head != WeightFormat::kBf16))
    throw std::invalid_argument("megakernel: tensor-parallel shards (" + config + ") are compiled with bf16 weights only");
  FF_CUDA_CHECK(cudaSetDevice(device));
  FF_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device));
  if (sm_count > 0) num_sms_ = std::min(num_sms_, sm_count);
  int coop = 0;
  FF_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  if (!coop) throw std::runtime_error("megakernel: device does not support cooperative launches");
  schedule_ = build_schedule(config_->dims, num_sms_, n_layers, formats);
  const std::vector<std::string> problems = schedule_problems(schedule_);
  if (!problems.empty()) throw std::runtime_error("megakernel: unsound schedule: " + problems.front());
  layout_ = scratch_layout(config_->dims, schedule_);
  for (const KernelLaunch& k : config_->shipped[int(formats.layers)])  // (either KV format: bind() picks; a shard has one)
    if (k) k.prepare();
  // mapped: the kernel's last CTA out writes each step's outcome there (publish_status)
  FF_CUDA_CHECK(cudaHostAlloc(&host_words_, 2 * kStatusWords * sizeof(int), cudaHostAllocMapped));
  std::fill_n(host_words_, 2 * kStatusWords, 0);
  FF_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&params_.host_status), host_words_, 0));
  recorded_words_ = checked_words_ = host_words_;
  FF_CUDA_CHECK(cudaEventCreateWithFlags(&recorded_, cudaEventDisableTiming));
}

void MegakernelEngine::set_tensor_parallel(int rank, const std::vector<void*>& exchange) {
  const int world = config_->dims.world;
  if (world == 1) throw std::invalid_argument("megakernel: " + config_label(config_->dims) + " is not a tensor-parallel shard");
  if (int(exchange.size()) != world)
    throw std::invalid_argument("megakernel: " + std::to_string(exchange.size()) + " exchange buffers given, the shard has " +
                                std::to_string(world) + " ranks");
  if (rank < 0 || rank >= world)
    throw std::invalid_argument("megakernel: rank " + std::to_string(rank) + " outside 0.." + std::to_string(world - 1));
  TensorParallel tp;
  tp.rank = rank;
  for (int q = 0; q < world; ++q) {
    if (!exchange[q]) throw std::invalid_argument("megakernel: rank " + std::to_string(q) + "'s exchange buffer is null");
    tp.partial[q] = static_cast<float*>(exchange[q]);
    tp.ready[q] = reinterpret_cast<unsigned*>(static_cast<uint8_t*>(exchange[q]) + exchange_partial_floats(config_->dims) * 4);
  }
  params_.tp = tp;
  exchange_ = exchange[rank];
}

MegakernelEngine::~MegakernelEngine() {
  cudaEventDestroy(recorded_);
  cudaFreeHost(host_words_);
}

void MegakernelEngine::bind(void* scratch, const ModelPointers& model) {
  if (!scratch) throw std::invalid_argument("megakernel: scratch is null");
  if (int(model.layers.size()) != schedule_.layers)
    throw std::invalid_argument("megakernel: " + std::to_string(model.layers.size()) + " layers given, engine built for " +
                                std::to_string(schedule_.layers));
  for (const LayerWeights& l : model.layers)
    for (const Matrix* m : {&l.qkv, &l.o, &l.gate_up, &l.down})
      if ((m->scale != nullptr) != (formats_.layers == WeightFormat::kFp8))
        throw std::invalid_argument(formats_.layers == WeightFormat::kFp8 ? "megakernel: an e4m3 layer matrix has no scales"
                                                                          : "megakernel: a bf16 layer matrix has scales");
  if ((model.lm_head.scale != nullptr) != (formats_.lm_head == WeightFormat::kFp8))
    throw std::invalid_argument(formats_.lm_head == WeightFormat::kFp8 ? "megakernel: the e4m3 LM head has no scales"
                                                                       : "megakernel: the bf16 LM head has scales");
  if (model.embed_packed && formats_.lm_head != WeightFormat::kBf16)
    throw std::invalid_argument("megakernel: a tied table is read from the packed LM head only when it is bf16");
  scratch_ = static_cast<uint8_t*>(scratch);
  FF_CUDA_CHECK(cudaSetDevice(device_));
  FF_CUDA_CHECK(cudaMemcpy(scratch_ + layout_.layer_table, model.layers.data(),
                           model.layers.size() * sizeof(LayerWeights), cudaMemcpyHostToDevice));
  const std::vector<int> flat = schedule_.flat();
  FF_CUDA_CHECK(cudaMemcpy(scratch_ + layout_.schedule, flat.data(), flat.size() * sizeof(int), cudaMemcpyHostToDevice));

  MegakernelParams& p = params_;
  p.layers = reinterpret_cast<const LayerWeights*>(scratch_ + layout_.layer_table);
  p.n_layers = schedule_.layers;
  p.embed = model.embed;
  p.embed_packed = model.embed_packed;
  p.final_norm = model.final_norm;
  p.lm_head = model.lm_head;
  p.rope_cos = model.rope_cos;
  p.rope_sin = model.rope_sin;
  p.rms_eps = model.rms_eps;
  p.kv_cache = model.kv_cache;
  if (model.kv_scale && !config_->shipped[int(formats_.layers)][int(KvFormat::kFp8)])
    throw std::invalid_argument("megakernel: " + config_label(config_->dims) +
                                " has no kernel for an FP8 KV cache (tensor-parallel shards are compiled with a bf16 cache "
                                "only)");
  p.kv_scale = model.kv_scale;
  p.max_batch = max_batch_;
  p.max_seq = max_seq_;
  p.scratch = Scratch{reinterpret_cast<float*>(scratch_ + layout_.x),
                      reinterpret_cast<float*>(scratch_ + layout_.q),
                      reinterpret_cast<float*>(scratch_ + layout_.k_new),
                      reinterpret_cast<float*>(scratch_ + layout_.qk_sq),
                      reinterpret_cast<bf16_t*>(scratch_ + layout_.attn_frag),
                      reinterpret_cast<bf16_t*>(scratch_ + layout_.act_frag),
                      reinterpret_cast<float*>(scratch_ + layout_.attn_part),
                      reinterpret_cast<float*>(scratch_ + layout_.argmax_part),
                      reinterpret_cast<float*>(scratch_ + layout_.sq_part),
                      reinterpret_cast<unsigned*>(scratch_ + layout_.counters),
                      reinterpret_cast<unsigned*>(scratch_ + layout_.attn_groups),
                      reinterpret_cast<unsigned*>(scratch_ + layout_.exits),
                      reinterpret_cast<int*>(scratch_ + layout_.error)};
  p.schedule = reinterpret_cast<const int*>(scratch_ + layout_.schedule);
  for (int op = 0; op < kNumOps; ++op) p.arrivals[op] = schedule_.arrivals(config_->dims, op);
  p.attn_chunks = schedule_.attn_chunks;
}

void MegakernelEngine::step(const int64_t* tokens, const int64_t* positions, int32_t* next_tokens, float* logits,
                            int batch, cudaStream_t stream) {
  if (!scratch_) throw std::runtime_error("megakernel: step before bind");
  if (batch < 1 || batch > std::min(max_batch_, kMaxBatch))
    throw std::invalid_argument("megakernel: batch " + std::to_string(batch) + " outside 1.." +
                                std::to_string(std::min(max_batch_, kMaxBatch)));
  if (!tokens || !positions || !next_tokens) throw std::invalid_argument("megakernel: null token or position buffer");
  if (config_->dims.world > 1 && !exchange_)
    throw std::runtime_error("megakernel: a tensor-parallel shard steps only after set_tensor_parallel()");
  MegakernelParams& p = params_;
  p.batch = batch;
  p.tokens = tokens;
  p.positions = positions;
  p.next_tokens = next_tokens;
  p.logits = logits;
  p.timeout_ns = static_cast<unsigned long long>(timeout_ms * 1e6);
  if (instr.skip_signal_op >= kNumOps)
    throw std::invalid_argument("megakernel: debug_skip_signal must be -1 (off) or an op index below " +
                                std::to_string(kNumOps) + ", got " + std::to_string(instr.skip_signal_op));
  p.instr = instr;
  const int kv = int(p.kv_scale != nullptr ? KvFormat::kFp8 : KvFormat::kBf16);  // the bound cache's
  const KernelLaunch* kernel = &config_->shipped[int(formats_.layers)][kv];
  if (instr.any()) {
    kernel = &config_->instrumented[int(formats_.layers)][kv];
    if (!*kernel)
      throw std::invalid_argument(
          "megakernel: timing_variant, trace and debug_skip_signal need the instrumented kernels, which this build "
          "does not have (build with -Ccmake.define.FLASHFORMER_INSTRUMENTED=ON, as scripts/gpu_check.sh does)");
    if (!instrumented_prepared_[kv]) kernel->prepare(), instrumented_prepared_[kv] = true;
  }
  const SmemSplit split = smem_split(config_->dims, batch);
  if (ring_stages_limit != 0 && ring_stages_limit < kMinStages)
    throw std::invalid_argument("megakernel: ring_stages_limit must be 0 (the plan's) or >= " +
                                std::to_string(kMinStages) + ", got " +
                                std::to_string(ring_stages_limit));
  p.ring_stages = ring_stages_limit > 0 ? std::min(split.stages, ring_stages_limit) : split.stages;
  if (inflight_stages_limit < 0) throw std::invalid_argument("megakernel: inflight_stages_limit must be >= 0");
  p.inflight_stages = inflight_stages_limit > 0 ? std::min(p.ring_stages, inflight_stages_limit) : p.ring_stages;
  if (weight_l2_policy != int(WeightL2Policy::kNormal) && weight_l2_policy != int(WeightL2Policy::kEvictFirst))
    throw std::invalid_argument("megakernel: weight_l2_policy must be 0 (normal) or 1 (evict first), got " +
                                std::to_string(weight_l2_policy));
  p.weight_l2_policy = weight_l2_policy;
  if (attn_min_work < 1) throw std::invalid_argument("megakernel: attn_min_work must be >= 1, got " + std::to_string(attn_min_work));
  p.attn_min_work = attn_min_work;
  p.union_bytes = split.union_bytes;
  FF_CUDA_CHECK(cudaSetDevice(device_));
  // Only now, past every check: a refused step must not advance the epoch, or the next step's
  // counter targets would count a step that never ran (and its waits time out).
  p.epoch = ++epoch_;
  kernel->launch(p, num_sms_, stream);
}

void MegakernelEngine::record(cudaStream_t stream) {
  if (!scratch_) return;
  if (recorded_batch_ >= 0) check_recorded();  // the last recorded outcome is still to be read
  // The kernel wrote the step's outcome (the error words, the arg-max tokens) into its half of the
  // mapped host words (publish_status): one event, and check_recorded() waits once.
  checked_batch_ = 0;
  FF_CUDA_CHECK(cudaEventRecord(recorded_, stream));
  recorded_batch_ = params_.next_tokens ? params_.batch : 0;
  recorded_words_ = host_words_ + (epoch_ & 1) * kStatusWords;
  recorded_stream_ = stream;
}

void MegakernelEngine::check_recorded() {
  if (recorded_batch_ < 0) return;
  const int batch = recorded_batch_;
  recorded_batch_ = -1;
  FF_CUDA_CHECK(cudaEventSynchronize(recorded_));
  const int* err = recorded_words_;
  if (err[0] == int(StepError::kNone)) {
    checked_batch_ = batch;
    checked_words_ = recorded_words_;
    return;
  }
  const int layers = schedule_.layers;
  // Any step launched since saw the error word and stopped early, so the counters may hold a
  // partial step: start the epochs afresh so the engine stays usable (on the steps' stream, after
  // those steps).
  FF_CUDA_CHECK(cudaMemsetAsync(scratch_ + layout_.counters, 0, layout_.counters_bytes, recorded_stream_));
  FF_CUDA_CHECK(cudaMemsetAsync(scratch_ + layout_.error, 0, kErrorWords * sizeof(int), recorded_stream_));
  if (exchange_)  // its ready words count exchanges from epoch 1 too (every rank resets its own)
    FF_CUDA_CHECK(cudaMemsetAsync(exchange_, 0, size_t(exchange_bytes()), recorded_stream_));
  FF_CUDA_CHECK(cudaStreamSynchronize(recorded_stream_));
  epoch_ = 0;
  const int code = err[0], task = err[1], detail = err[2], sm = err[3];
  std::fill_n(host_words_, 2 * kStatusWords, 0);  // (no step runs now: neither half holds a later outcome)
  if (code == int(StepError::kNonFiniteLogits))
    throw std::runtime_error("megakernel step produced non-finite logits (NaN or inf) in batch row " +
                             std::to_string(detail) + " (found by " + task_name(task, layers) +
                             "): its tokens are invalid; the weights or the inputs hold non-finite values");
  char ms[32];
  std::snprintf(ms, sizeof(ms), "%g", timeout_ms);
  char peer_ms[32];
  std::snprintf(peer_ms, sizeof(peer_ms), "%g", timeout_ms / kPeerTimeoutShare);
  if (code == int(StepError::kPeerTimeout) && task >= 0 && task < schedule_.tasks())
    throw std::runtime_error(std::string("megakernel step aborted: SM ") + std::to_string(sm) + " of rank " +
                             std::to_string(params_.tp.rank) + " waited more than " + peer_ms + " ms for rank " +
                             std::to_string(detail) + "'s partial sums of " + task_name(task, layers) +
                             ", which never came (is that rank's process alive and stepping?); the step's outputs "
                             "are invalid and this rank's engine has been reset");
  if (code != int(StepError::kDependencyTimeout) || task <= 0 || task >= schedule_.tasks())
    throw std::runtime_error("megakernel step aborted (error " + std::to_string(code) + ", task " +
                             std::to_string(task) + ")");
  // The waiter waits for the task before it (ops.hpp).
  throw std::runtime_error(std::string("megakernel step aborted: SM ") + std::to_string(sm) + " waited more than " +
                           ms + " ms for " + task_name(task - 1, layers) + " (needed by " + task_name(task, layers) +
                           "), which never completed; the step's outputs are invalid and the engine has been reset");
}

}  // namespace flashformer
