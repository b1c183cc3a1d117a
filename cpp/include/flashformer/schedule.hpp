// Host-side builder of the megakernel's work split, and the invariants ctest checks on it.
//
// Each task of the step (an op of a layer, ops.hpp) is cut into the op's units: 16-row blocks of
// a weight matrix (the matmul ops), (kv head, sequence chunk) pairs (attention), 16-wide slices
// of the hidden vector (embed). Every SM owns one contiguous range of units per task. Tasks run
// in the step's order; a task waits until every unit of the task before it is done in this step
// (epoch-based counters, see sync.cuh), so the split alone is the schedule.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "flashformer/ops.hpp"

namespace flashformer {

// Units of each op and the weight bytes one unit streams.
struct OpUnits {
  std::array<int, kNumOps> units{};
  std::array<int64_t, kNumOps> unit_bytes{};
};

inline OpUnits op_units(const ModelDims& d, int num_sms, const WeightFormats& formats) {
  OpUnits u;
  for (int op = 0; op < kNumOps; ++op) {
    u.units[op] = kOps[op].units(d, num_sms);
    u.unit_bytes[op] = kOps[op].unit_bytes(d, formats);
  }
  return u;
}

struct Schedule {
  int num_sms = 0;
  int layers = 0;
  int attn_chunks = 0;
  OpUnits units;
  // split[task][s] .. [s+1]: the units SM s owns; [num_sms] == units of the task's op.
  std::vector<std::vector<int>> split;

  int tasks() const { return int(split.size()); }
  const std::vector<int>& begin(int task) const { return split[task]; }
  int op_of(int task) const { return task_at(task, layers).op; }
  int count(int task, int sm) const { return split[task][sm + 1] - split[task][sm]; }
  // SMs owning at least one unit of op (the same in every layer): each signals once per step.
  int active_sms(int op) const { return std::min(units.units[op], num_sms); }
  // Counter arrivals that complete one task of op (the launch's MegakernelParams::arrivals).
  int arrivals(const ModelDims& d, int op) const { return kOps[op].arrivals(d, active_sms(op)); }
  // Weight bytes SM s streams in one decode step.
  int64_t step_bytes(int sm) const {
    int64_t b = 0;
    for (int t = 0; t < tasks(); ++t) b += int64_t(count(t, sm)) * units.unit_bytes[op_of(t)];
    return b;
  }
  // Flattened for the device: [tasks][num_sms + 1].
  std::vector<int> flat() const {
    std::vector<int> out;
    for (const std::vector<int>& b : split) out.insert(out.end(), b.begin(), b.end());
    return out;
  }
};

// Each task's units are spread so every SM gets floor or ceil of units/num_sms (so no task waits
// on a straggler); layer by layer, the ceil extras go to the SMs that so far stream the fewest
// weight bytes (the ops of a layer taken heaviest first), which balances the step's total.
inline Schedule build_schedule(const ModelDims& d, int num_sms, int layers, const WeightFormats& formats = {}) {
  Schedule s;
  s.num_sms = num_sms;
  s.layers = std::max(layers, 0);
  s.attn_chunks = attention_chunks(d, num_sms);
  s.units = op_units(d, num_sms, formats);
  s.split.assign(size_t(task_count(s.layers)), {});
  std::array<int, kNumOps> order;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return int64_t(s.units.units[a]) * s.units.unit_bytes[a] > int64_t(s.units.units[b]) * s.units.unit_bytes[b];
  });
  std::vector<int64_t> load(num_sms, 0);
  std::vector<int> by_load(num_sms);
  for (int layer = 0; layer < layers; ++layer)
    for (int op : order) {
      const int task = task_index(op, layer, layers);
      if (task < 0) continue;  // a kOnceFirst or kOnceLast op, in another layer
      const int units = s.units.units[op], base = units / num_sms, extra = units % num_sms;
      std::iota(by_load.begin(), by_load.end(), 0);
      std::stable_sort(by_load.begin(), by_load.end(), [&](int a, int b) { return load[a] < load[b]; });
      std::vector<int> counts(num_sms, base);
      for (int i = 0; i < extra; ++i) ++counts[by_load[i]];
      std::vector<int>& b = s.split[task];
      b.assign(num_sms + 1, 0);
      for (int sm = 0; sm < num_sms; ++sm) {
        b[sm + 1] = b[sm] + counts[sm];
        load[sm] += counts[sm] * s.units.unit_bytes[op];
      }
    }
  return s;
}

// Largest SM's step bytes over the mean (1.0 is perfect balance).
inline double byte_imbalance(const Schedule& s) {
  int64_t total = 0, most = 0;
  for (int sm = 0; sm < s.num_sms; ++sm) {
    total += s.step_bytes(sm);
    most = std::max(most, s.step_bytes(sm));
  }
  return total ? double(most) * s.num_sms / double(total) : 1.0;
}

// "qkv of layer 3": how errors and tests name a task.
inline std::string task_name(int task, int layers) {
  const Task t = task_at(task, layers);
  return std::string(t.op < 0 ? "?" : kOps[t.op].name) + " of layer " + std::to_string(t.layer);
}

// Every broken invariant, as a sentence; empty when the schedule is sound.
inline std::vector<std::string> schedule_problems(const Schedule& s) {
  std::vector<std::string> out;
  if (s.layers < 1) out.push_back("a model needs at least one layer");
  if (s.tasks() != task_count(s.layers)) out.push_back("the split does not list every task");
  if (!out.empty()) return out;
  for (int task = 0; task < s.tasks(); ++task) {
    const std::vector<int>& b = s.begin(task);
    const int op = s.op_of(task);
    const std::string name = task_name(task, s.layers);
    if (int(b.size()) != s.num_sms + 1) {
      out.push_back(name + ": split does not list every SM");
      continue;
    }
    // Exactly once: ranges start at 0, never go backwards, and end at the op's unit count.
    if (b.front() != 0 || b.back() != s.units.units[op]) out.push_back(name + ": units not covered exactly once");
    const int ceil_share = (s.units.units[op] + s.num_sms - 1) / s.num_sms;
    int active = 0;
    for (int sm = 0; sm < s.num_sms; ++sm) {
      const int n = b[sm + 1] - b[sm];
      if (n < 0) out.push_back(name + ": SM " + std::to_string(sm) + " has a negative range");
      if (n > ceil_share) out.push_back(name + ": SM " + std::to_string(sm) + " holds more than its share");
      active += n > 0;
    }
    // Counter targets assume the same number of signalling SMs in every layer.
    if (active != s.active_sms(op)) out.push_back(name + ": signalling SMs differ from the counter target");
    // Satisfiable in order: a task waits only for the one before it, which must exist.
    if (kOps[op].waits && task == 0) out.push_back(name + ": waits, but nothing runs before it");
  }
  return out;
}

}  // namespace flashformer
