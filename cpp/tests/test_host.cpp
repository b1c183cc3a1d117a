// Host-side tests of what the core states without a GPU.

#include <set>
#include <string>

#include "check.hpp"
#include "flashformer/fragment_layout.hpp"
#include "flashformer/kernel_config.hpp"
#include "flashformer/megakernel_params.hpp"
#include "flashformer/ops.hpp"
#include "flashformer/schedule.hpp"
#include "flashformer/trace.hpp"

using flashformer::kCompiledConfigs;
using flashformer::kOps;
using flashformer::op_index;

FF_TEST(config_names_are_unique_and_shapes_are_published_ones) {
  std::set<std::string> names;
  for (const flashformer::ModelDims& d : kCompiledConfigs) {
    FF_CHECK(names.insert(d.name).second);
    FF_CHECK(d.layers >= 1);
  }
}

FF_TEST(schedule_is_sound_for_every_config_at_132_and_114_sms) {
  for (const flashformer::ModelDims& d : kCompiledConfigs)
    for (int sms : {132, 114}) {
      const flashformer::Schedule s = flashformer::build_schedule(d, sms, d.layers);
      const std::vector<std::string> problems = flashformer::schedule_problems(s);
      for (const std::string& p : problems) std::printf("  %s @ %d SMs: %s\n", d.name, sms, p.c_str());
      FF_CHECK(problems.empty());
    }
}

FF_TEST(real_models_balance_weight_bytes_within_5_percent) {
  for (const flashformer::ModelDims& d : kCompiledConfigs) {
    if (std::string(d.name).rfind("tiny", 0) == 0) continue;  // fewer rows than SMs: balance is moot
    for (int sms : {132, 114}) {
      for (const flashformer::WeightFormats f :
           {flashformer::WeightFormats{}, flashformer::WeightFormats{flashformer::WeightFormat::kFp8,
                                                                     flashformer::WeightFormat::kFp8}}) {
        const double imbalance = flashformer::byte_imbalance(flashformer::build_schedule(d, sms, d.layers, f));
        std::printf("  %s @ %d SMs, %s: largest SM streams %.4fx the mean\n", d.name, sms,
                    f.layers == flashformer::WeightFormat::kFp8 ? "fp8" : "bf16", imbalance);
        FF_CHECK(imbalance <= 1.05);
      }
    }
  }
}

FF_TEST(schedule_problems_catches_a_broken_split) {
  using flashformer::task_index;
  flashformer::Schedule s = flashformer::build_schedule(kCompiledConfigs[0], 8, 2);
  s.split[task_index(op_index<flashformer::DownOp>, 1, 2)][3] += 1;  // SM 2 takes one unit too many
  s.split[task_index(op_index<flashformer::QkvOp>, 0, 2)].back() -= 1;  // a unit nobody produces
  const std::vector<std::string> problems = flashformer::schedule_problems(s);
  bool qkv = false, down = false;
  for (const std::string& p : problems) qkv |= p.rfind("qkv of layer 0", 0) == 0, down |= p.rfind("down of layer 1", 0) == 0;
  FF_CHECK(qkv && down);
}

FF_TEST(shared_memory_split_fits_227_kb_for_every_config_and_batch) {
  for (const flashformer::ModelDims& d : kCompiledConfigs) {
    std::printf("  %s: ring stages at batch 1..8:", d.name);
    for (int batch = 1; batch <= flashformer::kMaxBatch; ++batch) {
      const flashformer::SmemSplit s = flashformer::smem_split(d, batch);
      std::printf(" %d", s.stages);
      FF_CHECK(s.total_bytes <= flashformer::kSmemLimit - flashformer::kStaticSmemReserve);
      FF_CHECK(s.stages >= flashformer::kMinStages);
      FF_CHECK(batch * d.hidden * 2 <= s.union_bytes);  // normalized activations of the batch fit
    }
    std::printf("\n");
  }
}

FF_TEST(act_lane_vector_is_the_fragment_index_of_a_lanes_b_registers) {
  for (int rows = 1; rows <= flashformer::kMaxBatch; ++rows)
    for (int kb = 0; kb < 5; ++kb)
      for (int g = 0; g < rows; ++g)
        for (int t = 0; t < 4; ++t)
          FF_CHECK(flashformer::act_fragment_index(g, int64_t(kb) * flashformer::kKBlock + 2 * t, rows) ==
                   4 * int64_t(flashformer::act_lane_vector(kb, g, t, rows)));
}

FF_TEST(act_pair_index_is_the_fragment_index_of_even_k) {
  for (int rows = 1; rows <= flashformer::kMaxBatch; ++rows)
    for (int n = 0; n < rows; ++n)
      for (int k = 0; k < 96; k += 2)
        FF_CHECK(flashformer::act_fragment_index(n, k, rows) == flashformer::act_pair_index(n, k, rows));
}

FF_TEST(task_order_is_embed_then_every_layer_then_the_lm_head) {
  using namespace flashformer;
  const int layers = 3;
  FF_CHECK(task_count(layers) == 2 + kLayerOps * layers);
  FF_CHECK(kLayerOps == 5);
  std::vector<int> expected = {op_index<EmbedOp>};
  for (int l = 0; l < layers; ++l)
    for (int op : {op_index<QkvOp>, op_index<AttentionOp>, op_index<OProjOp>, op_index<GateUpOp>, op_index<DownOp>})
      expected.push_back(op);
  expected.push_back(op_index<LmHeadOp>);
  FF_CHECK(int(expected.size()) == task_count(layers));
  for (int t = 0; t < task_count(layers); ++t) {
    const Task task = task_at(t, layers);
    FF_CHECK(task.index == t && task.op == expected[t]);
    FF_CHECK(task.layer == (t == 0 ? 0 : t == task_count(layers) - 1 ? layers - 1 : (t - 1) / kLayerOps));
    FF_CHECK(task_index(task.op, task.layer, layers) == t);  // one slot each, both ways
  }
  FF_CHECK(task_index(op_index<EmbedOp>, 1, layers) == -1 && task_index(op_index<LmHeadOp>, 0, layers) == -1);
  FF_CHECK(task_name(task_index(op_index<DownOp>, 2, layers), layers) == "down of layer 2");
  FF_CHECK(trace_words_per_sm(layers) == kTraceHeader + int64_t(task_count(layers)) * kTraceFields);
}

FF_TEST(op_facts_are_those_the_kernel_relies_on) {
  using namespace flashformer;
  const ModelDims& d = kCompiledConfigs[kNumConfigs - 1];
  // only the first task has nothing to wait for; the LM head publishes itself, every other op once
  // per CTA that owns units (attention too: its units share each kv head's merge)
  for (int op = 0; op < kNumOps; ++op) FF_CHECK(kOps[op].waits == (op != op_index<EmbedOp>));
  for (int op = 0; op < kNumOps; ++op)
    FF_CHECK(kOps[op].signal == (op == op_index<LmHeadOp> ? Signal::kItself : Signal::kEveryCta));
  FF_CHECK(kOps[op_index<AttentionOp>].arrivals(d, 132) == 132);
  FF_CHECK(kOps[op_index<QkvOp>].arrivals(d, 100) == 100);
  FF_CHECK(kOps[op_index<QkvOp>].units(d, 132) * kRowBlock == d.qkv_rows());
  const WeightFormats bf16{}, fp8{WeightFormat::kFp8, WeightFormat::kBf16};
  FF_CHECK(kOps[op_index<DownOp>].unit_bytes(d, bf16) == int64_t(kRowBlock) * d.intermediate * 2);
  FF_CHECK(kOps[op_index<DownOp>].unit_bytes(d, fp8) == int64_t(kRowBlock) * d.intermediate);  // e4m3: a byte each
  FF_CHECK(kOps[op_index<LmHeadOp>].unit_bytes(d, fp8) == int64_t(kRowBlock) * d.hidden * 2);  // its own format
  std::set<std::string> names;
  for (const OpInfo& op : kOps) FF_CHECK(names.insert(op.name).second);
}

FF_TEST(every_packed_layer_weight_has_its_row_order_parameter) {
  using namespace flashformer;
  for (const ModelDims& d : kCompiledConfigs)
    for (const LayerWeightField& f : kLayerWeightFields) {
      if (f.order == RowOrder::kRopePairs) FF_CHECK(row_order_param(f.order, d) == d.head_dim);
      if (f.order == RowOrder::kGateUp) FF_CHECK(row_order_param(f.order, d) == d.intermediate);
      FF_CHECK(f.packed() || f.order == RowOrder::kIdentity);
      FF_CHECK(f.packed() != (f.vector != nullptr));  // a matrix or a vector
    }
}

int main() { return fftest::run_all(); }
