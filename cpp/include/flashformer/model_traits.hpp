// The compiled megakernel configs: one line each in kCompiledConfigs, the one list everything
// enumerates (CMake generates a translation unit per line, Python reads them through
// flashformer._C.configs()), and the tensor-parallel shards of some of them (kShardedConfigs).
// Layer count, RMSNorm epsilon, RoPE tables and batch size are run time; everything that sizes a
// loop or a buffer is here.
#pragma once

#include <cstdint>

namespace flashformer {

// Rows and reduction columns of one tensor-core weight fragment (mma.sync m16n8k16).
inline constexpr int kRowBlock = 16;
inline constexpr int kKBlock = 16;
// Batch columns of the mma (N = 8): every batch size 1..8 runs the same code path.
inline constexpr int kMaxBatch = 8;

// The parts of a decoder layer beyond Llama's, each compiled in only where a config has it.
enum Feature : unsigned {
  kPlain = 0,
  kQkvBias = 1,  // biases on the q, k and v projections (Qwen2)
  kQkNorm = 2,   // per-head RMSNorm of q and k before RoPE, one weight [head_dim] each (Qwen3)
};

// A config's shape and features. `family` (the published model's HF model_type), `layers` and
// `tied` describe the published model (benchmarks build its random-weight twin from them); the
// kernel itself takes any layer count and either LM head. `vocab` is the model's; the LM head
// is padded with zero rows to a multiple of 16 (padded_vocab) that never reach the logits.
// `world` > 1: the shape of one rank's shard of model `name` split over `world` ranks
// (shard_dims: its heads, kv heads and intermediate rows; hidden and vocab whole).
struct ModelDims {
  const char* name;
  const char* family;
  int hidden, intermediate, heads, kv_heads, head_dim, vocab;
  int layers;
  bool tied;
  unsigned features;
  int world = 1;
  constexpr bool has(Feature f) const { return (features & f) != 0; }
  constexpr int padded_vocab() const { return (vocab + kRowBlock - 1) / kRowBlock * kRowBlock; }
  constexpr int q_rows() const { return heads * head_dim; }
  constexpr int kv_rows() const { return kv_heads * head_dim; }
  constexpr int qkv_rows() const { return q_rows() + 2 * kv_rows(); }
};

// The one list of compiled configs. Adding a config of an existing architecture is one line here.
// Keep one config per line, each line starting with {"name", "family", : CMakeLists.txt reads the names.
// (Shapes as the published config.json files give them.)
inline constexpr ModelDims kCompiledConfigs[] = {
    // name             family     hidden  inter heads kv  dim   vocab layers  tied   features
    {"tiny-gqa",         "llama",      256,   512,   4,  2,  64,    512,    2, false, kPlain},
    {"tiny-d128",        "llama",      256,   768,   2,  1, 128,   1024,    2, true,  kPlain},
    {"tiny-qk-norm",     "qwen3",      256,   512,   4,  2, 128,   1000,    2, false, kQkNorm},
    {"tiny-bias",        "qwen2",      192,   384,   6,  2,  64,   1003,    2, true,  kQkvBias},
    {"llama-3.2-1b",     "llama",     2048,  8192,  32,  8,  64, 128256,   16, true,  kPlain},
    {"llama-3.2-3b",     "llama",     3072,  8192,  24,  8, 128, 128256,   28, true,  kPlain},
    {"llama-3.1-8b",     "llama",     4096, 14336,  32,  8, 128, 128256,   32, false, kPlain},
    {"llama-3.1-70b",    "llama",     8192, 28672,  64,  8, 128, 128256,   80, false, kPlain},
    {"mistral-7b-v0.3",  "mistral",   4096, 14336,  32,  8, 128,  32768,   32, false, kPlain},
    {"qwen3-0.6b",       "qwen3",     1024,  3072,  16,  8, 128, 151936,   28, true,  kQkNorm},
    {"qwen3-1.7b",       "qwen3",     2048,  6144,  16,  8, 128, 151936,   28, true,  kQkNorm},
    {"qwen3-4b",         "qwen3",     2560,  9728,  32,  8, 128, 151936,   36, true,  kQkNorm},
    {"qwen3-8b",         "qwen3",     4096, 12288,  32,  8, 128, 151936,   36, false, kQkNorm},
    {"qwen2.5-1.5b",     "qwen2",     1536,  8960,  12,  2, 128, 151936,   28, true,  kQkvBias},
    {"qwen2.5-3b",       "qwen2",     2048, 11008,  16,  2, 128, 151936,   36, true,  kQkvBias},
    {"qwen2.5-7b",       "qwen2",     3584, 18944,  28,  4, 128, 152064,   28, false, kQkvBias},
};
inline constexpr int kNumConfigs = int(sizeof(kCompiledConfigs) / sizeof(kCompiledConfigs[0]));

constexpr bool same_name(const char* a, const char* b) { return *a == *b && (*a == 0 || same_name(a + 1, b + 1)); }

// Tensor parallelism (Megatron's splits, as flashformer.tensor_parallel does them on the reference
// path): rank r of `world` holds q heads r*H/world.., their kv heads, intermediate rows
// r*I/world.. of gate and of up, and the matching columns of the O and down projections; the
// embeddings, norms and LM head are whole on every rank. The O and down projections' partial sums
// are exchanged between the ranks in the kernel (residual.cuh), so every rank holds the same
// residual stream, bit for bit, and picks the same tokens.
inline constexpr int kMaxWorld = 8;

// Why config `d` cannot be split over `world` ranks into a shard the kernel runs, or nullptr.
constexpr const char* shard_problem(const ModelDims& d, int world) {
  if (world < 1 || world > kMaxWorld) return "the tensor-parallel size must be 1..8";
  if (d.world != 1) return "the config is a shard already";
  if (d.heads % world || d.kv_heads % world) return "the heads and kv heads must divide by the tensor-parallel size";
  if (d.intermediate % world) return "the intermediate size must divide by the tensor-parallel size";
  if ((d.intermediate / world) % kKBlock) return "a rank's intermediate rows must be a multiple of 16 (the down projection's k blocks)";
  return nullptr;
}

// The shape one rank of `world` computes (all ranks' are the same).
constexpr ModelDims shard_dims(const ModelDims& d, int world) {
  ModelDims s = d;
  s.heads = d.heads / world, s.kv_heads = d.kv_heads / world, s.intermediate = d.intermediate / world;
  s.world = world;
  return s;
}

// The tensor-parallel shards compiled (bf16 weights and KV cache only), one per line, each line
// starting with {"config name", world}: CMakeLists.txt reads them.
struct ShardedConfig {
  const char* config;  // a name in kCompiledConfigs
  int world;
};
inline constexpr ShardedConfig kShardedConfigs[] = {
    {"tiny-gqa", 2},
    {"llama-3.1-8b", 2},
    {"llama-3.1-8b", 4},
    {"llama-3.1-70b", 4},
    {"llama-3.1-70b", 8},
};
inline constexpr int kNumShardedConfigs = int(sizeof(kShardedConfigs) / sizeof(kShardedConfigs[0]));

constexpr int config_index(const char* name) {
  for (int i = 0; i < kNumConfigs; ++i)
    if (same_name(kCompiledConfigs[i].name, name)) return i;
  return -1;
}

// Every kernel's shape: the kCompiledConfigs, then the shard of each kShardedConfigs entry.
inline constexpr int kNumKernelConfigs = kNumConfigs + kNumShardedConfigs;
constexpr ModelDims kernel_dims(int config) {
  if (config < kNumConfigs) return kCompiledConfigs[config];
  const ShardedConfig& s = kShardedConfigs[config - kNumConfigs];
  return shard_dims(kCompiledConfigs[config_index(s.config)], s.world);
}

constexpr bool sharded_configs_are_sound() {
  for (const ShardedConfig& s : kShardedConfigs)
    if (config_index(s.config) < 0 || s.world < 2 || shard_problem(kCompiledConfigs[config_index(s.config)], s.world))
      return false;
  return true;
}
static_assert(sharded_configs_are_sound(), "every kShardedConfigs entry names a config that splits over its world >= 2");

// Compile-time traits of kernel config `Config` (an index into kernel_dims). A shape the kernel
// cannot run fails here, in that config's translation unit, saying why.
template <int Config>
struct ModelTraits {
  static_assert(0 <= Config && Config < kNumKernelConfigs, "no such compiled config");
  static constexpr ModelDims kDims = kernel_dims(Config);
  static constexpr int kWorld = kDims.world;  // ranks the model is split over (residual.cuh exchanges)
  static constexpr int kHidden = kDims.hidden;
  static constexpr int kIntermediate = kDims.intermediate;
  static constexpr int kHeads = kDims.heads;
  static constexpr int kKvHeads = kDims.kv_heads;
  static constexpr int kHeadDim = kDims.head_dim;
  static constexpr int kVocab = kDims.vocab;              // logits per row
  static constexpr int kPaddedVocab = kDims.padded_vocab();  // LM-head rows
  static constexpr bool kQkvBias = kDims.has(Feature::kQkvBias);
  static constexpr bool kQkNorm = kDims.has(Feature::kQkNorm);
  static constexpr int kGroup = kHeads / kKvHeads;  // q heads per kv head (GQA)
  static constexpr int kQRows = kDims.q_rows();
  static constexpr int kKvRows = kDims.kv_rows();
  static constexpr int kQkvRows = kDims.qkv_rows();
  static constexpr int kGateUpRows = 2 * kIntermediate;

  static_assert(1 <= kWorld && kWorld <= kMaxWorld, "a model splits over 1..kMaxWorld ranks");
  static_assert(kHeads % kKvHeads == 0, "q heads must be a multiple of kv heads");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "attention maps head_dim onto a warp: 64 or 128");
  static_assert((kHeadDim / 2) % 8 == 0, "a 16-row block holds 8 RoPE pairs of one head");
  static_assert(kHidden % kRowBlock == 0 && kHidden % kKBlock == 0, "hidden must divide the 16x16 fragment");
  static_assert(kIntermediate % 8 == 0 && kIntermediate % kKBlock == 0, "a 16-row block holds 8 gate and 8 up rows");
  static_assert(kQRows % kKBlock == 0, "attention output feeds the O projection in 16-wide k blocks");
};

}  // namespace flashformer
