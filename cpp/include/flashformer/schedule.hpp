// Host-side builder of the megakernel's work split, and the invariants ctest checks on it.
//
// Each op of a layer is cut into units: 16-row blocks of a weight matrix (the matmul ops),
// (kv head, sequence chunk) pairs (attention), 16-wide slices of the hidden vector (embed).
// Every SM owns one contiguous range of units per op; the same split serves every layer.
// Ops run in the fixed order below; an op waits until every unit of the op it depends on is
// done in this step (epoch-based counters, see sync.cuh), so the split alone is the schedule.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "flashformer/model_traits.hpp"

namespace flashformer {

enum class Op : int { kEmbed = 0, kQkv, kAttention, kOProj, kGateUp, kDown, kLmHead, kCount };
inline constexpr int kNumOps = static_cast<int>(Op::kCount);
inline constexpr std::array<const char*, kNumOps> kOpNames = {"embed", "qkv", "attention", "o_proj",
                                                              "gate_up", "down", "lm_head"};

// The op whose completion `op` waits for (within a layer, or across the layer boundary).
constexpr Op dependency_of(Op op) {
  switch (op) {
    case Op::kQkv: return Op::kDown;  // of the previous layer; layer 0 waits for kEmbed
    case Op::kAttention: return Op::kQkv;
    case Op::kOProj: return Op::kAttention;
    case Op::kGateUp: return Op::kOProj;
    case Op::kDown: return Op::kGateUp;
    case Op::kLmHead: return Op::kDown;  // of the last layer
    default: return Op::kCount;          // kEmbed waits for nothing
  }
}

// The (op, layer) whose completion `op` of `layer` waits for: kEmbed for layer 0's qkv, the
// previous layer's down projection for a later qkv, the same layer's dependency_of otherwise.
// (Meaningless for kEmbed, which waits for nothing.)
struct Dependency {
  Op op;
  int layer;
};
constexpr Dependency dependency_at(Op op, int layer) {
  if (op == Op::kQkv) return layer == 0 ? Dependency{Op::kEmbed, 0} : Dependency{Op::kDown, layer - 1};
  return {dependency_of(op), layer};
}
static_assert(dependency_at(Op::kQkv, 0).op == Op::kEmbed && dependency_at(Op::kQkv, 3).op == Op::kDown &&
              dependency_at(Op::kQkv, 3).layer == 2 && dependency_at(Op::kOProj, 3).op == Op::kAttention &&
              dependency_at(Op::kOProj, 3).layer == 3);

// Units of each op and the weight bytes one unit streams.
struct OpUnits {
  std::array<int, kNumOps> units{};
  std::array<int64_t, kNumOps> unit_bytes{};
};

// Attention is split into this many sequence chunks per kv head, so that about one
// (kv head, chunk) task lands on each SM; the chunk length follows the context at run time.
inline int attention_chunks(const ModelDims& d, int num_sms) { return std::max(1, num_sms / d.kv_heads); }

inline OpUnits op_units(const ModelDims& d, int num_sms) {
  constexpr int64_t kBf16 = 2;
  OpUnits u;
  auto set = [&](Op op, int units, int64_t bytes) {
    u.units[int(op)] = units;
    u.unit_bytes[int(op)] = bytes;
  };
  set(Op::kEmbed, d.hidden / kRowBlock, 0);
  set(Op::kQkv, d.qkv_rows() / kRowBlock, kRowBlock * int64_t(d.hidden) * kBf16);
  set(Op::kAttention, d.kv_heads * attention_chunks(d, num_sms), 0);
  set(Op::kOProj, d.hidden / kRowBlock, kRowBlock * int64_t(d.q_rows()) * kBf16);
  set(Op::kGateUp, 2 * d.intermediate / kRowBlock, kRowBlock * int64_t(d.hidden) * kBf16);
  set(Op::kDown, d.hidden / kRowBlock, kRowBlock * int64_t(d.intermediate) * kBf16);
  set(Op::kLmHead, d.vocab / kRowBlock, kRowBlock * int64_t(d.hidden) * kBf16);
  return u;
}

// Where a task's split lives: ops of every layer, kEmbed in layer 0, kLmHead in the last layer.
inline bool runs_in_layer(Op op, int layer, int layers) {
  return op == Op::kEmbed ? layer == 0 : op == Op::kLmHead ? layer == layers - 1 : true;
}

struct Schedule {
  int num_sms = 0;
  int layers = 0;
  int attn_chunks = 0;
  OpUnits units;
  // split[layer * kNumOps + op][s] .. [s+1]: the units SM s owns; [num_sms] == units of op.
  // Empty for (layer, op) pairs where the op does not run.
  std::vector<std::vector<int>> split;

  const std::vector<int>& begin(Op op, int layer) const { return split[layer * kNumOps + int(op)]; }
  int count(Op op, int layer, int sm) const {
    const std::vector<int>& b = begin(op, layer);
    return b.empty() ? 0 : b[sm + 1] - b[sm];
  }
  // SMs owning at least one unit of op (the same in every layer): each signals once per step.
  int active_sms(Op op) const { return std::min(units.units[int(op)], num_sms); }
  // Weight bytes SM s streams in one decode step.
  int64_t step_bytes(int sm) const {
    int64_t b = 0;
    for (int l = 0; l < layers; ++l)
      for (int op = 0; op < kNumOps; ++op) b += int64_t(count(Op(op), l, sm)) * units.unit_bytes[op];
    return b;
  }
  // Flattened for the device: [layers][kNumOps][num_sms + 1], zeros where an op does not run.
  std::vector<int> flat() const {
    std::vector<int> out;
    for (const std::vector<int>& b : split) {
      if (b.empty()) out.insert(out.end(), num_sms + 1, 0);
      else out.insert(out.end(), b.begin(), b.end());
    }
    return out;
  }
};

// Each op's units are spread so every SM gets floor or ceil of units/num_sms (so no op waits
// on a straggler); layer by layer, the ceil extras go to the SMs that so far stream the fewest
// weight bytes, which balances the step's total.
inline Schedule build_schedule(const ModelDims& d, int num_sms, int layers) {
  Schedule s;
  s.num_sms = num_sms;
  s.layers = layers;
  s.attn_chunks = attention_chunks(d, num_sms);
  s.units = op_units(d, num_sms);
  s.split.assign(size_t(std::max(layers, 0)) * kNumOps, {});
  std::array<int, kNumOps> order;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return int64_t(s.units.units[a]) * s.units.unit_bytes[a] > int64_t(s.units.units[b]) * s.units.unit_bytes[b];
  });
  std::vector<int64_t> load(num_sms, 0);
  std::vector<int> by_load(num_sms);
  for (int layer = 0; layer < layers; ++layer)
    for (int op : order) {
      if (!runs_in_layer(Op(op), layer, layers)) continue;
      const int units = s.units.units[op], base = units / num_sms, extra = units % num_sms;
      std::iota(by_load.begin(), by_load.end(), 0);
      std::stable_sort(by_load.begin(), by_load.end(), [&](int a, int b) { return load[a] < load[b]; });
      std::vector<int> counts(num_sms, base);
      for (int i = 0; i < extra; ++i) ++counts[by_load[i]];
      std::vector<int>& b = s.split[layer * kNumOps + op];
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

// Every broken invariant, as a sentence; empty when the schedule is sound.
inline std::vector<std::string> schedule_problems(const Schedule& s) {
  std::vector<std::string> out;
  if (s.layers < 1) out.push_back("a model needs at least one layer");
  if (int(s.split.size()) != s.layers * kNumOps) out.push_back("the split does not list every (layer, op)");
  if (!out.empty()) return out;
  for (int layer = 0; layer < s.layers; ++layer)
    for (int op = 0; op < kNumOps; ++op) {
      const std::vector<int>& b = s.begin(Op(op), layer);
      const std::string name = std::string(kOpNames[op]) + " of layer " + std::to_string(layer);
      if (!runs_in_layer(Op(op), layer, s.layers)) {
        if (!b.empty()) out.push_back(name + ": split where the op does not run");
        continue;
      }
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
      if (active != s.active_sms(Op(op))) out.push_back(name + ": signalling SMs differ from the counter target");
      // Satisfiable in order: an op waits only on an op that ran before it in the step.
      const Op dep = dependency_of(Op(op));
      const bool earlier = dep == Op::kCount || int(dep) < op || (Op(op) == Op::kQkv && dep == Op::kDown);
      if (!earlier) out.push_back(name + ": waits on an op that runs later");
    }
  return out;
}

}  // namespace flashformer
