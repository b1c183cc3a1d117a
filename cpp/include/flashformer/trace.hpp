// The step trace: optional per-SM timestamps and wait counters of one decode step, for finding
// where time goes (benchmarks/profile_step.py reads it). Host-visible so Python and the engine
// size the buffer from the same constants. Written only by the instrumented build, when
// MegakernelParams::instr.trace is set.
#pragma once

#include <array>
#include <cstdint>

#include "flashformer/ops.hpp"

namespace flashformer {

// Per SM: kTraceHeader words, then kTraceFields words for each task of the step (ops.hpp's task order).
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

constexpr int64_t trace_words_per_sm(int layers) { return kTraceHeader + int64_t(task_count(layers)) * kTraceFields; }

}  // namespace flashformer
