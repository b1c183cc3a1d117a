// Host-side tests of what the core states without a GPU.

#include <algorithm>
#include <climits>
#include <set>
#include <string>
#include <vector>

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
  using flashformer::WeightFormat;
  for (int rows = 1; rows <= flashformer::kMaxBatch; ++rows)
    for (int n = 0; n < rows; ++n)
      for (int k = 0; k < 96; k += 2) {
        FF_CHECK(flashformer::act_fragment_index(n, k, rows) == flashformer::act_pair_index<WeightFormat::kBf16>(n, k, rows));
        FF_CHECK(flashformer::fp8_act_fragment_index(n, k, rows) == flashformer::act_pair_index<WeightFormat::kFp8>(n, k, rows));
      }
}

FF_TEST(fp8_act_lane_vector_is_the_fragment_index_of_a_lanes_eight_elements) {
  for (int rows = 1; rows <= flashformer::kMaxBatch; ++rows)
    for (int f = 0; f < 3; ++f)
      for (int g = 0; g < rows; ++g)
        for (int t = 0; t < 4; ++t) {
          const int64_t first = flashformer::fp8_act_fragment_index(g, int64_t(f) * 32 + 4 * t, rows);
          FF_CHECK(first == 8 * int64_t(flashformer::act_lane_vector(f, g, t, rows)));
          for (int e = 0; e < 8; ++e)  // elements 0-3: k 4t.., 4-7: k 16 + 4t..
            FF_CHECK(flashformer::fp8_act_fragment_index(g, int64_t(f) * 32 + (e / 4) * 16 + 4 * t + e % 4, rows) ==
                     first + e);
        }
}

FF_TEST(fp8_fragment_element_inverts_the_e4m3_fragment_index) {
  std::set<int64_t> seen;
  for (int lane = 0; lane < flashformer::kWarpSize; ++lane)
    for (int i = 0; i < 16; ++i) {
      const flashformer::FragmentElement e = flashformer::fp8_fragment_element(lane / 4, lane % 4, i);
      FF_CHECK(e.row >= 0 && e.row < 16 && e.col >= 0 && e.col < 32);
      FF_CHECK(flashformer::fp8_weight_fragment_index(e.row, e.col, 32) == lane * 16 + i);
      seen.insert(int64_t(e.row) * 32 + e.col);
    }
  FF_CHECK(seen.size() == 16 * 32);
}

// The PTX ISA's register layouts, replayed on the host over values in their packed places: an e4m3
// fragment's lane registers (fp8_weight_fragment_index) and its activations' (fp8_act_fragment_index)
// must multiply to W x both as one mma.m16n8k32 (8-bit operands: register j holds A[g + 8 (j%2)][16 (j/2)
// + 4t + i], B[16 j + 4t + i][g], i = 0..3) and as the dequantizing matmul's two mma.m16n8k16 halves
// (16-bit: register j holds A[g + 8 (j%2)][8 (j/2) + 2t + p], B[8 j + 2t + p][g], p = 0, 1), half h
// taking words 2h, 2h+1 of the lane (low 16 bits, then high: weight_layout.cuh's dequant_fp8_fragment)
// and activation elements 4h..4h+3.
FF_TEST(e4m3_fragments_and_their_activations_multiply_to_w_times_x_in_both_mma_shapes) {
  using namespace flashformer;
  constexpr int R = 16, N = 8, K = 96;
  std::vector<int64_t> w(R * K), x(N * K), packed(R * K), act(N * K);
  for (int i = 0; i < R * K; ++i) w[i] = (i * 37 + 11) % 29 - 14;
  for (int i = 0; i < N * K; ++i) x[i] = (i * 53 + 7) % 31 - 15;
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) packed[fp8_weight_fragment_index(r, k, K)] = w[r * K + k];
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) act[fp8_act_fragment_index(n, k, N)] = x[n * K + k];
  constexpr int64_t kUnset = INT64_MIN;
  int64_t d32[R][N] = {}, d16[R][N] = {};
  for (int f = 0; f < K / 32; ++f) {
    int64_t a32[R][32], b32[32][N], a16[2][R][16], b16[2][16][N];
    std::fill_n(&a32[0][0], R * 32, kUnset), std::fill_n(&b32[0][0], 32 * N, kUnset);
    std::fill_n(&a16[0][0][0], 2 * R * 16, kUnset), std::fill_n(&b16[0][0][0], 2 * 16 * N, kUnset);
    bool twice = false;  // (the layouts are bijections: each slot is written once)
    auto put = [&](int64_t& slot, int64_t v) { twice |= slot != kUnset, slot = v; };
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int g = lane / 4, t = lane % 4;
      const int64_t* q = &packed[(int64_t(f) * kWarpSize + lane) * 16];  // 4 registers of 4 bytes
      const int64_t* b = &act[int64_t(act_lane_vector(f, g, t, N)) * 8];
      for (int j = 0; j < 4; ++j)
        for (int i = 0; i < 4; ++i) put(a32[g + 8 * (j % 2)][16 * (j / 2) + 4 * t + i], q[4 * j + i]);
      for (int j = 0; j < 2; ++j)
        for (int i = 0; i < 4; ++i) put(b32[16 * j + 4 * t + i][g], b[4 * j + i]);
      for (int h = 0; h < 2; ++h) {
        const int64_t* words = q + 8 * h;  // words 2h, 2h+1
        // the half's registers: word 2h's low pair, word 2h+1's low pair, their high pairs
        const int64_t* regs[4] = {words, words + 4, words + 2, words + 6};
        for (int j = 0; j < 4; ++j)
          for (int p = 0; p < 2; ++p) put(a16[h][g + 8 * (j % 2)][8 * (j / 2) + 2 * t + p], regs[j][p]);
        for (int j = 0; j < 2; ++j)
          for (int p = 0; p < 2; ++p) put(b16[h][8 * j + 2 * t + p][g], b[4 * h + 2 * j + p]);
      }
    }
    FF_CHECK(!twice);
    FF_CHECK(std::count(&a32[0][0], &a32[0][0] + R * 32, kUnset) == 0 && std::count(&b32[0][0], &b32[0][0] + 32 * N, kUnset) == 0);
    FF_CHECK(std::count(&a16[0][0][0], &a16[0][0][0] + 2 * R * 16, kUnset) == 0 &&
             std::count(&b16[0][0][0], &b16[0][0][0] + 2 * 16 * N, kUnset) == 0);
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < N; ++n) {
        for (int k = 0; k < 32; ++k) d32[r][n] += a32[r][k] * b32[k][n];
        for (int h = 0; h < 2; ++h)
          for (int k = 0; k < 16; ++k) d16[r][n] += a16[h][r][k] * b16[h][k][n];
      }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) {
      int64_t expected = 0;
      for (int k = 0; k < K; ++k) expected += w[r * K + k] * x[n * K + k];
      FF_CHECK(d32[r][n] == expected && d16[r][n] == expected);
    }
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

// Tensor parallelism (issue 21): the shards' shapes, and the schedule every rank of one runs.
FF_TEST(every_sharded_config_is_its_model_split_over_its_ranks) {
  using namespace flashformer;
  for (int i = 0; i < kNumShardedConfigs; ++i) {
    const ModelDims& whole = kCompiledConfigs[config_index(kShardedConfigs[i].config)];
    const ModelDims d = kernel_dims(kNumConfigs + i);
    const int w = kShardedConfigs[i].world;
    FF_CHECK(d.world == w && w >= 2 && same_name(d.name, whole.name));
    FF_CHECK(d.heads * w == whole.heads && d.kv_heads * w == whole.kv_heads && d.intermediate * w == whole.intermediate);
    FF_CHECK(d.hidden == whole.hidden && d.head_dim == whole.head_dim && d.vocab == whole.vocab && d.features == whole.features);
    FF_CHECK(smem_split(d, kMaxBatch).stages >= kMinStages);
    // the layers' weights are split exactly once over the ranks; the O and down projections
    // still write every row of the residual (their partial sums are exchanged)
    const OpUnits part = op_units(d, 132, {}), all = op_units(whole, 132, {});
    for (int op : {op_index<QkvOp>, op_index<OProjOp>, op_index<GateUpOp>, op_index<DownOp>})
      FF_CHECK(int64_t(part.units[op]) * part.unit_bytes[op] * w == int64_t(all.units[op]) * all.unit_bytes[op]);
    for (int op : {op_index<OProjOp>, op_index<DownOp>}) FF_CHECK(part.units[op] * kRowBlock == d.hidden);
    FF_CHECK(exchange_partial_floats(d) == int64_t(kExchangeSets) * w * d.hidden * kMaxBatch);
  }
  for (int i = 0; i < kNumConfigs; ++i) FF_CHECK(kernel_dims(i).world == 1 && same_name(kernel_dims(i).name, kCompiledConfigs[i].name));
}

// Every rank of a shard builds its schedule from the same shape, so SM s of each owns the same row
// blocks of the O and down projections in every layer: the exchange pairs SM s with SM s.
FF_TEST(every_shard_schedule_is_sound_and_the_same_on_every_rank) {
  using namespace flashformer;
  for (int i = 0; i < kNumShardedConfigs; ++i) {
    const ModelDims d = kernel_dims(kNumConfigs + i);
    for (int sms : {132, 114, 66}) {
      const Schedule s = build_schedule(d, sms, d.layers);
      const std::vector<std::string> problems = schedule_problems(s);
      for (const std::string& p : problems) std::printf("  %s-tp%d @ %d SMs: %s\n", d.name, d.world, sms, p.c_str());
      FF_CHECK(problems.empty());
      FF_CHECK(build_schedule(d, sms, d.layers).split == s.split);
    }
  }
}

FF_TEST(shard_problem_says_what_does_not_split) {
  using namespace flashformer;
  const ModelDims& llama8b = kCompiledConfigs[config_index("llama-3.1-8b")];
  for (int w : {1, 2, 4, 8}) FF_CHECK(shard_problem(llama8b, w) == nullptr);
  FF_CHECK(std::string(shard_problem(llama8b, 3)).find("heads") != std::string::npos);
  FF_CHECK(std::string(shard_problem(llama8b, 16)).find("1..8") != std::string::npos);
  FF_CHECK(std::string(shard_problem(llama8b, 0)).find("1..8") != std::string::npos);
  FF_CHECK(std::string(shard_problem(kCompiledConfigs[config_index("qwen2.5-1.5b")], 4)).find("kv heads") != std::string::npos);
  FF_CHECK(std::string(shard_problem(shard_dims(llama8b, 2), 2)).find("shard already") != std::string::npos);
  ModelDims odd = llama8b;
  odd.intermediate = 96;  // 24 rows a rank at 4 ranks: not whole k blocks of 16
  FF_CHECK(std::string(shard_problem(odd, 4)).find("multiple of 16") != std::string::npos);
  odd.intermediate = 100;
  FF_CHECK(std::string(shard_problem(odd, 8)).find("intermediate size must divide") != std::string::npos);
}

int main() { return fftest::run_all(); }
