// Compile-time model shapes of the compiled megakernel configs. Layer count, RMSNorm epsilon,
// RoPE tables and batch size are run-time; everything that sizes a loop or a buffer is here.
#pragma once

#include <array>
#include <tuple>

namespace flashformer {

// Rows and reduction columns of one tensor-core weight fragment (mma.sync m16n8k16).
inline constexpr int kRowBlock = 16;
inline constexpr int kKBlock = 16;
// Batch columns of the mma (N = 8): every batch size 1..8 runs the same code path.
inline constexpr int kMaxBatch = 8;

// Run-time view of a config's shape (host code: schedule, engine, bindings).
struct ModelDims {
  const char* name;
  int hidden, intermediate, heads, kv_heads, head_dim, vocab;
  constexpr int q_rows() const { return heads * head_dim; }
  constexpr int kv_rows() const { return kv_heads * head_dim; }
  constexpr int qkv_rows() const { return q_rows() + 2 * kv_rows(); }
};

template <int Hidden, int Intermediate, int Heads, int KvHeads, int HeadDim, int Vocab>
struct ModelTraits {
  static constexpr int kHidden = Hidden;
  static constexpr int kIntermediate = Intermediate;
  static constexpr int kHeads = Heads;
  static constexpr int kKvHeads = KvHeads;
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kVocab = Vocab;
  static constexpr int kGroup = Heads / KvHeads;  // q heads per kv head (GQA)
  static constexpr int kQRows = Heads * HeadDim;
  static constexpr int kKvRows = KvHeads * HeadDim;
  static constexpr int kQkvRows = kQRows + 2 * kKvRows;
  static constexpr int kGateUpRows = 2 * Intermediate;

  static_assert(Heads % KvHeads == 0, "q heads must be a multiple of kv heads");
  static_assert(HeadDim == 64 || HeadDim == 128, "attention maps head_dim onto a warp: 64 or 128");
  static_assert((HeadDim / 2) % 8 == 0, "a 16-row block holds 8 RoPE pairs of one head");
  static_assert(Hidden % kRowBlock == 0 && Hidden % kKBlock == 0, "hidden must divide the 16x16 fragment");
  static_assert(Intermediate % 8 == 0 && Intermediate % kKBlock == 0, "a 16-row block holds 8 gate and 8 up rows");
  static_assert(kQRows % kKBlock == 0, "attention output feeds the O projection in 16-wide k blocks");
  static_assert(Vocab % kRowBlock == 0, "vocab must be a multiple of 16 (pad the LM head)");
};

// Compiled configs. Names and shapes reach Python through flashformer._C.configs(); each kernel
// is instantiated in its own cpp/src/kernels/megakernel_<config>.cu.
//                                      hidden  inter heads kv  dim   vocab
struct TinyGqa : ModelTraits<             256,   512,   4,  2,  64,    512> { static constexpr const char* kName = "tiny-gqa"; };
struct TinyD128 : ModelTraits<            256,   768,   2,  1, 128,   1024> { static constexpr const char* kName = "tiny-d128"; };
struct Llama32_1B : ModelTraits<         2048,  8192,  32,  8,  64, 128256> { static constexpr const char* kName = "llama-3.2-1b"; };
struct Llama32_3B : ModelTraits<         3072,  8192,  24,  8, 128, 128256> { static constexpr const char* kName = "llama-3.2-3b"; };
struct Llama31_8B : ModelTraits<         4096, 14336,  32,  8, 128, 128256> { static constexpr const char* kName = "llama-3.1-8b"; };

template <class T>
constexpr ModelDims dims_of() {
  return {T::kName, T::kHidden, T::kIntermediate, T::kHeads, T::kKvHeads, T::kHeadDim, T::kVocab};
}

// The one list of compiled configs; everything that enumerates them derives from it.
using CompiledConfigTypes = std::tuple<TinyGqa, TinyD128, Llama32_1B, Llama32_3B, Llama31_8B>;

template <class... Ts>
constexpr std::array<ModelDims, sizeof...(Ts)> dims_of_all(std::tuple<Ts...>*) {
  return {dims_of<Ts>()...};
}
inline constexpr auto kCompiledConfigs = dims_of_all(static_cast<CompiledConfigTypes*>(nullptr));

}  // namespace flashformer
