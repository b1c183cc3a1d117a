// The one list of the decode step's ops (op.hpp says what each declares). The kernel's task
// loop, the schedule, the counters, the trace, the bindings, Python and the tests all derive
// from StepOps; adding an op is one header in ops/ plus one entry here.
//
// The step's task order: the kOnceFirst ops, then the kEveryLayer ops of layer 0, 1, ..., then
// the kOnceLast ops, each group in list order. Every task that waits waits for the task before it.
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>

#include "flashformer/op.hpp"
#include "flashformer/ops/attention.cuh"
#include "flashformer/ops/down.cuh"
#include "flashformer/ops/embed.cuh"
#include "flashformer/ops/gate_up.cuh"
#include "flashformer/ops/lm_head.cuh"
#include "flashformer/ops/o_proj.cuh"
#include "flashformer/ops/qkv.cuh"

namespace flashformer {

using StepOps = OpList<EmbedOp, QkvOp, AttentionOp, OProjOp, GateUpOp, DownOp, LmHeadOp>;
inline constexpr int kNumOps = StepOps::kSize;
static_assert(kNumOps <= kMaxOps, "raise kMaxOps (op.hpp) for a longer op list");

// Index of op O in StepOps.
template <class O, class... Os>
constexpr int index_in(OpList<Os...>) {
  int i = 0, found = -1;
  ((found = found < 0 && std::is_same_v<O, Os> ? i : found, ++i), ...);
  return found;
}
template <class O>
inline constexpr int op_index = index_in<O>(StepOps{});

// An op's facts for host code that holds an op index (op.hpp).
struct OpInfo {
  const char* name;
  Scope scope;
  Signal signal;
  bool waits;
  int (*units)(const ModelDims&, int num_sms);
  int64_t (*unit_bytes)(const ModelDims&, const WeightFormats&);
  int (*arrivals)(const ModelDims&, int owning_ctas);
};
template <class... Os>
constexpr std::array<OpInfo, sizeof...(Os)> op_table(OpList<Os...>) {
  return {OpInfo{Os::kName, Os::kScope, Os::kSignal, Os::kWaits, &Os::units, &Os::unit_bytes, &Os::arrivals}...};
}
inline constexpr std::array<OpInfo, kNumOps> kOps = op_table(StepOps{});

constexpr int ops_in(Scope scope) {
  int n = 0;
  for (const OpInfo& op : kOps) n += op.scope == scope;
  return n;
}
inline constexpr int kLayerOps = ops_in(Scope::kEveryLayer);

// Tasks of a step of `layers` layers.
constexpr int task_count(int layers) {
  return ops_in(Scope::kOnceFirst) + kLayerOps * layers + ops_in(Scope::kOnceLast);
}

// The task at position `task` of the step (Task::op and Task::layer; layer 0 for the kOnceFirst
// ops, the last layer for the kOnceLast ones).
constexpr Task task_at(int task, int layers) {
  const int first = ops_in(Scope::kOnceFirst), body = kLayerOps * layers;
  const Scope scope = task < first ? Scope::kOnceFirst : task < first + body ? Scope::kEveryLayer : Scope::kOnceLast;
  int rank = scope == Scope::kOnceFirst ? task : scope == Scope::kEveryLayer ? (task - first) % kLayerOps : task - first - body;
  const int layer = scope == Scope::kOnceFirst ? 0 : scope == Scope::kEveryLayer ? (task - first) / kLayerOps : layers - 1;
  for (int op = 0; op < kNumOps; ++op)
    if (kOps[op].scope == scope && rank-- == 0) return {task, layer, op};
  return {task, layer, -1};
}

// The position of op `op` of layer `layer` in the step (-1 where the op does not run).
constexpr int task_index(int op, int layer, int layers) {
  const Scope scope = kOps[op].scope;
  if ((scope == Scope::kOnceFirst && layer != 0) || (scope == Scope::kOnceLast && layer != layers - 1)) return -1;
  int rank = 0;
  for (int o = 0; o < op; ++o) rank += kOps[o].scope == scope;
  const int first = ops_in(Scope::kOnceFirst);
  return scope == Scope::kOnceFirst ? rank
         : scope == Scope::kEveryLayer ? first + layer * kLayerOps + rank
                                       : first + kLayerOps * layers + rank;
}

static_assert(!kOps[task_at(0, 1).op].waits, "the step's first task has nothing before it to wait for");

}  // namespace flashformer
