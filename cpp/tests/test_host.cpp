// Host-side tests of what the core states without a GPU.

#include "check.hpp"
#include "flashformer/fragment_layout.hpp"
#include "flashformer/kernel_config.hpp"
#include "flashformer/schedule.hpp"
#include "flashformer/tma_limits.hpp"
#include "flashformer/trace.hpp"

using flashformer::tma_2d_problem;

static bool mentions(const std::string& s, const char* word) { return s.find(word) != std::string::npos; }

FF_TEST(tma_accepts_aligned_row_major_bf16) {
  FF_CHECK(tma_2d_problem(0x1000, 64, 64, 2).empty());
  FF_CHECK(tma_2d_problem(0x1000, 1, 8, 2).empty());            // one 16-byte row
  FF_CHECK(tma_2d_problem(0x1000, 128256, 4096, 2).empty());    // Llama-3 LM head
  FF_CHECK(tma_2d_problem(0x1010, 200, 392, 2).empty());        // ragged tiles, 16-byte aligned base
}

FF_TEST(tma_rejects_what_the_engine_cannot_read) {
  FF_CHECK(mentions(tma_2d_problem(0x1000, 0, 64, 2), "empty"));
  FF_CHECK(mentions(tma_2d_problem(0x1000, 64, -1, 2), "empty"));
  FF_CHECK(mentions(tma_2d_problem(0x1008, 64, 64, 2), "16-byte aligned"));
  const std::string odd = tma_2d_problem(0x1000, 64, 12, 2);
  FF_CHECK(mentions(odd, "multiple of 16") && mentions(odd, "multiple of 8"));
  FF_CHECK(mentions(tma_2d_problem(0x1000, int64_t{1} << 32, 64, 2), "2^32"));
  FF_CHECK(mentions(tma_2d_problem(0x1000, 2, int64_t{1} << 32, 2), "2^32"));
}

FF_TEST(tma_limits_are_the_hardware_ones) {
  static_assert(flashformer::kTmaMaxBoxDim == 256);
  static_assert(flashformer::kSwizzleBytes == 128);
  FF_CHECK(flashformer::kSwizzleAtomAlignBytes == 8 * flashformer::kSwizzleBytes);  // 8 rows x 128 B
}

// Layers of the real models; the tiny test configs use 2. A new real config must be listed here.
static int layers_of(const flashformer::ModelDims& d) {
  const std::string name = d.name;
  if (name == "llama-3.2-1b") return 16;
  if (name == "llama-3.2-3b") return 28;
  if (name == "llama-3.1-8b") return 32;
  FF_CHECK(name.rfind("tiny", 0) == 0);  // an unlisted real config would be tested at 2 layers
  return 2;
}

FF_TEST(schedule_is_sound_for_every_config_at_132_and_114_sms) {
  for (const flashformer::ModelDims& d : flashformer::kCompiledConfigs)
    for (int sms : {132, 114}) {
      const flashformer::Schedule s = flashformer::build_schedule(d, sms, layers_of(d));
      const std::vector<std::string> problems = flashformer::schedule_problems(s);
      for (const std::string& p : problems) std::printf("  %s @ %d SMs: %s\n", d.name, sms, p.c_str());
      FF_CHECK(problems.empty());
    }
}

FF_TEST(real_models_balance_weight_bytes_within_5_percent) {
  for (const flashformer::ModelDims& d : flashformer::kCompiledConfigs) {
    if (std::string(d.name).rfind("tiny", 0) == 0) continue;  // fewer rows than SMs: balance is moot
    for (int sms : {132, 114}) {
      const double imbalance = flashformer::byte_imbalance(flashformer::build_schedule(d, sms, layers_of(d)));
      std::printf("  %s @ %d SMs: largest SM streams %.4fx the mean\n", d.name, sms, imbalance);
      FF_CHECK(imbalance <= 1.05);
    }
  }
}

FF_TEST(schedule_problems_catches_a_broken_split) {
  flashformer::Schedule s = flashformer::build_schedule(flashformer::kCompiledConfigs[0], 8, 2);
  s.split[1 * flashformer::kNumOps + int(flashformer::Op::kDown)][3] += 1;  // SM 2 takes one unit too many
  s.split[0 * flashformer::kNumOps + int(flashformer::Op::kQkv)].back() -= 1;  // a unit nobody produces
  const std::vector<std::string> problems = flashformer::schedule_problems(s);
  bool qkv = false, down = false;
  for (const std::string& p : problems) qkv |= p.rfind("qkv of layer 0", 0) == 0, down |= p.rfind("down of layer 1", 0) == 0;
  FF_CHECK(qkv && down);
}

FF_TEST(shared_memory_split_fits_227_kb_for_every_config_and_batch) {
  for (const flashformer::ModelDims& d : flashformer::kCompiledConfigs) {
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

FF_TEST(trace_tasks_are_numbered_in_kernel_order) {
  using flashformer::Op;
  const int layers = 3;
  std::vector<int> order = {flashformer::trace_task(Op::kEmbed, 0, layers)};
  for (int l = 0; l < layers; ++l)
    for (Op op : {Op::kQkv, Op::kAttention, Op::kOProj, Op::kGateUp, Op::kDown})
      order.push_back(flashformer::trace_task(op, l, layers));
  order.push_back(flashformer::trace_task(Op::kLmHead, layers - 1, layers));
  FF_CHECK(int(order.size()) == flashformer::trace_tasks(layers));
  for (int i = 0; i < int(order.size()); ++i) FF_CHECK(order[i] == i);  // one slot each, in order
  FF_CHECK(flashformer::trace_words_per_sm(layers) ==
           flashformer::kTraceHeader + int64_t(order.size()) * flashformer::kTraceFields);
}

int main() { return fftest::run_all(); }
