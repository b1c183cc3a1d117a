// Host-side tests of what the core states without a GPU.
#include "check.hpp"
#include "flashformer/tma_limits.hpp"

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

int main() { return fftest::run_all(); }
