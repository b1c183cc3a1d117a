// What every op struct of the decode step declares (ops/<op>.cuh; the list of them is ops.hpp).
//
// An op is one struct named after it. Its facts are static members that host code (the
// schedule, the engine, the bindings, the tests) reads without CUDA:
//   kName                         the op's name (traces, errors, Python)
//   kScope                        once before the layers, in every layer, or once after them
//   kSignal                       who publishes its completion: the kernel's task loop once per
//                                 CTA that owns units, or the op itself (a last-finisher reduction)
//   kWaits                        whether it waits for the task before it in the step (it reads
//                                 that task's outputs, and through it everything earlier)
//   units(dims, num_sms)          units of work per task: 16-row weight blocks, attention
//                                 (kv head, chunk) pairs, ...
//   unit_bytes(dims, formats)     weight bytes one unit streams (the schedule balances them)
//   arrivals(dims, owning_ctas)   counter arrivals that complete one task of the op
// and, in CUDA code only (#ifdef __CUDACC__, so host compilers never see device code), its two
// roles: `produce` (the producer warp streams the task's weights and KV stages through the ring)
// and `consume` (the consumer warps compute its units), both
//   template <class T> __device__ static bool f(Role<T>&, Task, int first_unit, int end_unit)
// returning false when the step was aborted.
#pragma once

#include <cstdint>

#include "flashformer/kernel_config.hpp"
#include "flashformer/model_traits.hpp"

namespace flashformer {

enum class Scope : int { kOnceFirst, kEveryLayer, kOnceLast };
enum class Signal : int { kEveryCta, kItself };

// One task of the step: op `op` (its index in StepOps) of layer `layer`, at position `index` of
// the step's task order (which indexes the schedule, the counters and the trace); `prev_op` is
// the op of the task before it (the one it waits for), -1 for the first.
struct Task {
  int index;
  int layer;
  int op;
  int prev_op = -1;
};

// The defaults an op struct inherits and overrides.
struct OpDefaults {
  static constexpr Scope kScope = Scope::kEveryLayer;
  static constexpr Signal kSignal = Signal::kEveryCta;
  static constexpr bool kWaits = true;
  static constexpr int64_t unit_bytes(const ModelDims&, const WeightFormats&) { return 0; }
  static constexpr int arrivals(const ModelDims&, int owning_ctas) { return owning_ctas; }
};

// Weight bytes of one 16-row block of a matrix with K columns in format f (a matmul op's unit).
constexpr int64_t row_block_bytes(int k, WeightFormat f) { return int64_t(kRowBlock) * k * weight_bytes(f); }

// Room for ops in per-op arrays of the launch parameters (ops.hpp checks the list fits).
inline constexpr int kMaxOps = 16;

template <class... Ops>
struct OpList {
  static constexpr int kSize = sizeof...(Ops);
};

}  // namespace flashformer
