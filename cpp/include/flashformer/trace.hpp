// The step trace: optional per-SM timestamps and wait counters of one decode step, for finding
// where time goes (benchmarks/profile_step.py reads it). Host-visible so Python and the engine
// size the buffer from the same constants. Off (a null pointer) in normal operation.
#pragma once

#include <array>
#include <cstdint>

#include "flashformer/schedule.hpp"

namespace flashformer {

// Per SM: kTraceHeader words, then kTraceFields words for each task (an op of a layer, in
// for_each_task order: embed, then qkv..down of every layer, then the LM head).
enum class TraceHeader : int { kStartNs, kStartCycles, kEndNs, kEndCycles, kCount };
enum class TraceField : int {
  kTaskStartNs,    // consumers: the task begins (before its dependency wait)
  kReadyNs,        // consumers: the dependency is met
  kComputedNs,     // consumers: the op's work is done
  kSyncedNs,       // consumers: every warp's outputs are written (the CTA barrier before the signal)
  kSignalledNs,    // consumers: the op's completion is published
  kDataWaitCycles, // consumer warp 0: cycles waiting for weight stages to land (memory-bound time)
  kProduceStartNs, // producer: first stage of the task requested
  kProduceEndNs,   // producer: last stage of the task requested
  kSlotWaitCycles, // producer: cycles waiting for the consumers to free a stage (consumer-bound time)
  kLandWaitCycles, // producer: cycles waiting for an in-flight stage to land (the in-flight limit: memory-bound time)
  kCount
};
inline constexpr int kTraceHeader = int(TraceHeader::kCount);
inline constexpr int kTraceFields = int(TraceField::kCount);
inline constexpr std::array<const char*, kTraceHeader> kTraceHeaderNames = {"start_ns", "start_cycles", "end_ns",
                                                                           "end_cycles"};
inline constexpr std::array<const char*, kTraceFields> kTraceFieldNames = {
    "task_start_ns", "ready_ns", "computed_ns", "synced_ns", "signalled_ns",
    "data_wait_cycles", "produce_start_ns", "produce_end_ns", "slot_wait_cycles", "land_wait_cycles"};

inline constexpr int kLayerOps = int(Op::kDown) - int(Op::kQkv) + 1;  // qkv, attention, o, gate_up, down

constexpr int trace_tasks(int layers) { return 2 + kLayerOps * layers; }
constexpr int64_t trace_words_per_sm(int layers) { return kTraceHeader + int64_t(trace_tasks(layers)) * kTraceFields; }

// Task index of (op, layer) in for_each_task order.
constexpr int trace_task(Op op, int layer, int layers) {
  return op == Op::kEmbed ? 0 : op == Op::kLmHead ? 1 + kLayerOps * layers : 1 + kLayerOps * layer + int(op) - int(Op::kQkv);
}

}  // namespace flashformer
