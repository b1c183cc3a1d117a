// Op-level GPU tests of the megakernel's building blocks, each against a host computation on fresh
// random data with poisoned outputs: weight packing and unpacking (bf16 and e4m3), one matmul (row
// blocks through the weight ring into an epilogue, in both weight formats), and attention's
// cross-chunk merge. Exit 77 (ctest: skipped)
// when no sm_90 device is visible.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.hpp"
#include "cuda_check.hpp"
#include "devices.hpp"
#include "flashformer/gemv.cuh"
#include "flashformer/ops/attention.cuh"
#include "kernels/launch.hpp"

namespace ff = flashformer;

namespace {

using Tiny = ff::KernelTraits<0, ff::Build::kShipped>;  // tiny-gqa: head_dim 64
using TinyD128 = ff::KernelTraits<1, ff::Build::kShipped>;  // tiny-d128: head_dim 128
constexpr uint16_t kPoison = 0xFFFF;  // a bf16 NaN: an unwritten element fails

std::mt19937& rng() {
  static std::mt19937 gen = [] {
    const unsigned seed = std::random_device{}();
    std::printf("random seed %u\n", seed);
    return std::mt19937(seed);
  }();
  return gen;
}

uint16_t to_bf16_bits(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
float from_bf16_bits(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// The value of e4m3 byte b (NaN for S.1111.111).
double e4m3_value(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return (b & 0x80) ? -mag : mag;
}
std::vector<uint8_t> random_e4m3(size_t n) {  // every code but the NaNs: subnormals, zeros and 448 too
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> out(n);
  for (auto& x : out)
    do x = uint8_t(byte(rng()));
    while ((x & 0x7F) == 0x7F);
  return out;
}
std::vector<uint16_t> random_bf16(size_t n, float scale = 1.f) {  // normal, never zeros
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<uint16_t> out(n);
  for (auto& x : out) x = to_bf16_bits(normal(rng()));
  return out;
}

template <class V>
struct DeviceBuffer {
  V* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t n_) : n(n_) { FF_CUDA_CHECK(cudaMalloc(&ptr, n * sizeof(V))); }
  explicit DeviceBuffer(const std::vector<V>& host) : DeviceBuffer(host.size()) {
    FF_CUDA_CHECK(cudaMemcpy(ptr, host.data(), n * sizeof(V), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  void fill_bytes(int byte) { FF_CUDA_CHECK(cudaMemset(ptr, byte, n * sizeof(V))); }
  std::vector<V> host() const {
    std::vector<V> out(n);
    FF_CUDA_CHECK(cudaDeviceSynchronize());
    FF_CUDA_CHECK(cudaMemcpy(out.data(), ptr, n * sizeof(V), cudaMemcpyDeviceToHost));
    return out;
  }
};

// --- weight packing ---------------------------------------------------------------------------

// pack_weight against the host statement of the fragment order, then unpack_weight back.
int64_t pack_mismatches(int64_t rows, int64_t cols, ff::RowOrder order, int64_t param) {
  const std::vector<uint16_t> w = random_bf16(size_t(rows * cols));
  std::vector<uint16_t> expected(w.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      expected[ff::weight_fragment_index(r, c, cols)] = w[ff::source_row(order, r, param) * cols + c];
  DeviceBuffer<uint16_t> src(w), packed(w.size()), back(w.size());
  packed.fill_bytes(0xFF), back.fill_bytes(0xFF);
  ff::pack_weight(src.ptr, packed.ptr, rows, cols, int(order), param, nullptr);
  ff::unpack_weight(packed.ptr, back.ptr, rows, cols, int(order), param, nullptr);
  const std::vector<uint16_t> got = packed.host(), round_trip = back.host();
  int64_t bad = 0;
  for (size_t i = 0; i < w.size(); ++i) bad += (got[i] != expected[i]) + (round_trip[i] != w[i]);
  if (bad) std::printf("  (%lld, %lld) order %d: %lld mismatches\n", (long long)rows, (long long)cols, int(order), (long long)bad);
  return bad;
}

// pack_weight_fp8 against the host statement of the e4m3 fragment order (bytes and scales), then
// unpack_weight_fp8 against bf16(value * scale) at every element.
int64_t pack_fp8_mismatches(int64_t rows, int64_t cols, ff::RowOrder order, int64_t param) {
  const std::vector<uint8_t> w = random_e4m3(size_t(rows * cols));
  std::uniform_real_distribution<float> scale_dist(1e-4f, 1e-1f);
  std::vector<float> scale(rows);
  for (auto& s : scale) s = scale_dist(rng());
  std::vector<uint8_t> expected(w.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      expected[ff::fp8_weight_fragment_index(r, c, cols)] = w[ff::source_row(order, r, param) * cols + c];
  DeviceBuffer<uint8_t> src(w), packed(w.size());
  DeviceBuffer<float> d_scale(scale), packed_scale(rows);
  DeviceBuffer<uint16_t> back(w.size());
  packed.fill_bytes(0x7F), packed_scale.fill_bytes(0xFF), back.fill_bytes(0xFF);
  ff::pack_weight_fp8(src.ptr, d_scale.ptr, packed.ptr, packed_scale.ptr, rows, cols, int(order), param, nullptr);
  ff::unpack_weight_fp8(packed.ptr, packed_scale.ptr, back.ptr, rows, cols, int(order), param, nullptr);
  const std::vector<uint8_t> got = packed.host();
  const std::vector<float> got_scale = packed_scale.host();
  const std::vector<uint16_t> deq = back.host();
  int64_t bad = 0;
  for (size_t i = 0; i < w.size(); ++i) bad += got[i] != expected[i];
  for (int64_t r = 0; r < rows; ++r) bad += got_scale[r] != scale[ff::source_row(order, r, param)];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float want = float(e4m3_value(w[r * cols + c])) * scale[r];  // exact in fp32: 4 x 24 bits
      bad += deq[r * cols + c] != to_bf16_bits(want);
    }
  if (bad) std::printf("  e4m3 (%lld, %lld) order %d: %lld mismatches\n", (long long)rows, (long long)cols, int(order),
                       (long long)bad);
  return bad;
}

// --- one matmul through the ring ----------------------------------------------------------------

// Writes each row block's 16 x 8 result tile to p.logits as out[row][batch column].
template <class T>
struct ProbeEpilogue {
  ff::Consumer<T>& c;
  __device__ ProbeEpilogue(ff::Consumer<T>& c_, const ff::Task&) : c(c_) {}
  __device__ void prefetch(int) {}
  __device__ void row_block(int rb, const ff::AccTile& acc) {
    const int g = c.lane / 4, t = c.lane % 4;
    for (int q = 0; q < 2; ++q) {
      const int n = 2 * t + q;
      if (n >= c.p.batch) continue;
      c.p.logits[(rb * ff::kRowBlock + g) * ff::kMaxBatch + n] = acc[q];
      c.p.logits[(rb * ff::kRowBlock + g + 8) * ff::kMaxBatch + n] = acc[2 + q];
    }
  }
  __device__ void finish() {}
};

// One CTA: the producer warp streams `row_blocks` packed row blocks of K = 16 kblocks through
// the ring, the consumer warps multiply them by the batch's activations (global fragment order:
// staged into shared memory when they fit, read from L2 when not), as the megakernel's matmul ops do.
template <class T, ff::WeightFormat F>
__global__ void __launch_bounds__(ff::kThreads, 1)
    matmul_probe(const __grid_constant__ ff::MegakernelParams p, const ff::Matrix w, const ff::bf16_t* act,
                 int kblocks, int row_blocks) {
  extern __shared__ __align__(128) uint8_t smem[];
  const ff::SmemRegions regions(smem, p);
  if (threadIdx.x == 0) regions.ring<T>(p).init();
  __syncthreads();  // the ring's barriers are initialized before either role uses them
  const int warp = threadIdx.x / ff::kWarpSize;
  if (ff::warp_role(warp) == ff::WarpRole::kProducer) {
    if (threadIdx.x % ff::kWarpSize == 0) {
      ff::Producer<T> pr(p, regions);
      ff::stream_row_blocks<F>(pr, w, kblocks * ff::kKBlock, 0, row_blocks);
    }
    return;
  }
  if (ff::warp_role(warp) != ff::WarpRole::kConsumer) return;
  ff::Consumer<T> c(p, regions, int(threadIdx.x));
  ff::run_matmul_global_b<T, F, ProbeEpilogue<T>>(c, act, kblocks, w, ff::Task{0, 0, 0}, 0, row_blocks);
}

// Largest error of the probe's results against a double-precision product of the same bf16 (or
// e4m3 times row scale) values, relative to sum |w||x| of each output (fp32 accumulation in another
// order).
template <ff::WeightFormat F>
double matmul_error(int row_blocks, int kblocks, int batch) {
  using T = ff::KernelTraits<0, ff::Build::kShipped, F>;  // tiny-gqa
  constexpr bool kFp8 = F == ff::WeightFormat::kFp8;
  const int rows = row_blocks * ff::kRowBlock, K = kblocks * ff::kKBlock;
  const std::vector<uint16_t> w16 = random_bf16(kFp8 ? 0 : size_t(rows) * K), x = random_bf16(size_t(ff::kMaxBatch) * K);
  const std::vector<uint8_t> w8 = random_e4m3(kFp8 ? size_t(rows) * K : 0);
  std::vector<float> scale(rows);
  std::uniform_real_distribution<float> scale_dist(1e-3f, 1e-1f);
  for (auto& s : scale) s = scale_dist(rng());
  auto weight = [&](int r, int k) {
    return kFp8 ? e4m3_value(w8[size_t(r) * K + k]) * scale[r] : double(from_bf16_bits(w16[size_t(r) * K + k]));
  };
  // Fragment order, all kMaxBatch rows, in the activations' format (weight_layout.cuh): bf16, or
  // for e4m3 weights f16 times 2^-shift; `activation` is the value the matmul multiplies.
  std::vector<uint16_t> act(size_t(ff::kMaxBatch) * K);
  std::vector<double> activation(act.size());
  for (int n = 0; n < ff::kMaxBatch; ++n)
    for (int k = 0; k < K; ++k) {
      const size_t i = size_t(n) * K + k;
      if constexpr (kFp8) {
        const __half h = __float2half_rn(from_bf16_bits(x[i]) / float(1 << ff::kF16ActivationShift));
        std::memcpy(&act[ff::act_index<F>(n, k)], &h, 2);
        activation[i] = double(__half2float(h)) * (1 << ff::kF16ActivationShift);
      } else {
        act[ff::act_fragment_index(n, k)] = x[i];
        activation[i] = from_bf16_bits(x[i]);
      }
    }
  DeviceBuffer<uint16_t> w_rows(w16), w_packed(w16.size()), d_act(act);
  DeviceBuffer<uint8_t> w8_rows(w8), w8_packed(w8.size());
  DeviceBuffer<float> d_scale(scale), packed_scale(rows);
  ff::Matrix m;
  if constexpr (kFp8) {
    ff::pack_weight_fp8(w8_rows.ptr, d_scale.ptr, w8_packed.ptr, packed_scale.ptr, rows, K,
                        int(ff::RowOrder::kIdentity), 0, nullptr);
    m = ff::Matrix{w8_packed.ptr, packed_scale.ptr};
  } else {
    ff::pack_weight(w_rows.ptr, w_packed.ptr, rows, K, int(ff::RowOrder::kIdentity), 0, nullptr);
    m = ff::Matrix{w_packed.ptr, nullptr};
  }
  DeviceBuffer<float> out(size_t(rows) * ff::kMaxBatch);
  out.fill_bytes(0xFF);  // NaN
  DeviceBuffer<int> error(ff::kErrorWords);
  error.fill_bytes(0);

  const ff::SmemSplit split = ff::smem_split(T::kDims, batch);
  ff::MegakernelParams p{};
  p.batch = batch;
  p.logits = out.ptr;
  p.scratch.error = error.ptr;
  p.ring_stages = split.stages;
  p.union_bytes = split.union_bytes;
  p.inflight_stages = 3;
  p.weight_l2_policy = int(ff::WeightL2Policy::kEvictFirst);
  FF_CUDA_CHECK(cudaFuncSetAttribute(matmul_probe<T, F>, cudaFuncAttributeMaxDynamicSharedMemorySize, split.total_bytes));
  matmul_probe<T, F><<<1, ff::kThreads, split.total_bytes>>>(p, m, reinterpret_cast<const ff::bf16_t*>(d_act.ptr),
                                                              kblocks, row_blocks);
  FF_CUDA_CHECK(cudaGetLastError());
  const std::vector<float> got = out.host();
  double worst = 0;
  for (int r = 0; r < rows; ++r)
    for (int n = 0; n < ff::kMaxBatch; ++n) {
      const float v = got[size_t(r) * ff::kMaxBatch + n];
      if (n >= batch) continue;  // columns past the batch are never written
      double ref = 0, mag = 0;
      for (int k = 0; k < K; ++k) {
        const double a = weight(r, k), b = activation[size_t(n) * K + k];
        ref += a * b, mag += std::fabs(a * b);
      }
      const double err = std::isfinite(v) ? std::fabs(v - ref) / mag : INFINITY;
      worst = err > worst ? err : worst;
    }
  std::printf("  %s: %d row blocks x %d k blocks, batch %d: largest error %.2e of sum|w x|\n", kFp8 ? "e4m3" : "bf16",
              row_blocks, kblocks, batch, worst);
  return worst;
}

// --- attention's cross-chunk merge ---------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(ff::kConsumerThreads, 1)
    merge_probe(const __grid_constant__ ff::MegakernelParams p, int kv_head, int active, int first, int step) {
  extern __shared__ __align__(128) uint8_t smem[];
  const ff::SmemRegions regions(smem, p);
  ff::Consumer<T> c(p, regions, int(threadIdx.x));
  ff::AttentionKernel<T>::merge_chunks(c, kv_head, active, first, step);
}

// Random partials (o, m, l) per (row, head, chunk), some chunks empty (l = 0, as a chunk past a
// row's context leaves them), merged on the device against the host's exp2-weighted sum.
template <class T>
double merge_error(int batch, int chunks, int active, int kv_head) {
  constexpr int D = T::kHeadDim, G = T::kGroup, S = ff::attn_part_stride(D);
  std::uniform_real_distribution<float> m_dist(-6.f, 6.f), l_dist(0.5f, 4.f);
  std::normal_distribution<float> o_dist(0.f, 1.f);
  std::bernoulli_distribution empty(0.2);
  std::vector<float> part(size_t(ff::kMaxBatch) * T::kHeads * chunks * S, 0.f);
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < T::kHeads; ++h)
      for (int ch = 0; ch < active; ++ch) {
        float* pc = &part[((size_t(b) * T::kHeads + h) * chunks + ch) * S];
        const bool none = ch > 0 && empty(rng());  // chunk 0 always holds the row's first positions
        for (int d = 0; d < D; ++d) pc[d] = none ? 0.f : o_dist(rng());
        pc[D] = none ? -FLT_MAX : m_dist(rng());
        pc[D + 1] = none ? 0.f : l_dist(rng());
      }
  DeviceBuffer<float> d_part(part);
  DeviceBuffer<uint16_t> out(size_t(ff::kMaxBatch) * T::kQRows);
  out.fill_bytes(0xFF);
  ff::MegakernelParams p{};
  p.batch = batch;
  p.attn_chunks = chunks;
  p.scratch.attn_part = d_part.ptr;
  p.scratch.attn_frag = reinterpret_cast<ff::bf16_t*>(out.ptr);
  p.ring_stages = 0;
  p.union_bytes = ff::smem_split(T::kDims, batch).union_bytes;
  const int smem = ff::kMiscBytes + p.union_bytes + ff::kReduceBytes;
  FF_CUDA_CHECK(cudaFuncSetAttribute(merge_probe<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  // The head's (row, q head) pairs in three shares, as three of its units merge them
  // (first = 0, 1, 2, step 3): together they write every output of the head.
  for (int first = 0; first < 3; ++first) merge_probe<T><<<1, ff::kConsumerThreads, smem>>>(p, kv_head, active, first, 3);
  FF_CUDA_CHECK(cudaGetLastError());
  const std::vector<uint16_t> got = out.host();
  double worst = 0;
  for (int b = 0; b < batch; ++b)
    for (int g = 0; g < G; ++g) {
      const int head = kv_head * G + g;
      double m_max = -INFINITY;
      for (int ch = 0; ch < active; ++ch) {
        const float* pc = &part[((size_t(b) * T::kHeads + head) * chunks + ch) * S];
        if (pc[D + 1] != 0.f) m_max = std::fmax(m_max, pc[D]);
      }
      for (int d = 0; d < D; ++d) {
        double o = 0, l = 0;
        for (int ch = 0; ch < active; ++ch) {
          const float* pc = &part[((size_t(b) * T::kHeads + head) * chunks + ch) * S];
          if (pc[D + 1] == 0.f) continue;
          const double s = std::exp2(double(pc[D]) - m_max);
          o += s * pc[d], l += s * pc[D + 1];
        }
        const float v = from_bf16_bits(got[ff::act_fragment_index(b, int64_t(head) * D + d)]);
        const double err = std::isfinite(v) ? std::fabs(v - o / l) / (std::fabs(o / l) + 0.05) : INFINITY;
        worst = err > worst ? err : worst;
      }
    }
  // The other kv heads' outputs are left alone.
  for (int b = 0; b < batch; ++b)
    for (int64_t k = 0; k < T::kQRows; ++k)
      if (k / (int64_t(G) * D) != kv_head && got[ff::act_fragment_index(b, k)] != kPoison) worst = INFINITY;
  std::printf("  head_dim %d, batch %d, %d of %d chunks, kv head %d: largest relative error %.2e\n", D, batch, active,
              chunks, kv_head, worst);
  return worst;
}

}  // namespace

FF_TEST(pack_weight_is_the_host_fragment_order_and_unpack_weight_inverts_it) {
  FF_CHECK(pack_mismatches(64, 64, ff::RowOrder::kIdentity, 0) == 0);
  FF_CHECK(pack_mismatches(48, 1040, ff::RowOrder::kIdentity, 0) == 0);  // a ragged last span of k blocks
  FF_CHECK(pack_mismatches(3 * 128, 256, ff::RowOrder::kRopePairs, 128) == 0);
  FF_CHECK(pack_mismatches(4 * 64, 512, ff::RowOrder::kRopePairs, 64) == 0);
  FF_CHECK(pack_mismatches(2 * 96, 256, ff::RowOrder::kGateUp, 96) == 0);
  FF_CHECK(pack_mismatches(4096, 4096, ff::RowOrder::kIdentity, 0) == 0);  // a weight-sized matrix
}

FF_TEST(pack_weight_fp8_is_the_host_e4m3_fragment_order_and_unpack_dequantizes_it) {
  FF_CHECK(pack_fp8_mismatches(64, 64, ff::RowOrder::kIdentity, 0) == 0);
  FF_CHECK(pack_fp8_mismatches(48, 1056, ff::RowOrder::kIdentity, 0) == 0);
  FF_CHECK(pack_fp8_mismatches(3 * 128, 256, ff::RowOrder::kRopePairs, 128) == 0);
  FF_CHECK(pack_fp8_mismatches(2 * 96, 256, ff::RowOrder::kGateUp, 96) == 0);
}

FF_TEST(pack_and_unpack_refuse_what_they_cannot_lay_out) {
  DeviceBuffer<uint16_t> buf(64 * 64);
  auto refused = [&](auto&& call) {
    try {
      call();
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  FF_CHECK(refused([&] { ff::pack_weight(buf.ptr, buf.ptr, 64, 12, 0, 0, nullptr); }));
  FF_CHECK(refused([&] { ff::unpack_weight(buf.ptr, buf.ptr, 60, 64, 0, 0, nullptr); }));
  FF_CHECK(refused([&] { ff::unpack_weight(buf.ptr, buf.ptr, 64, 64, int(ff::RowOrder::kGateUp), 16, nullptr); }));
  FF_CHECK(refused([&] { ff::pack_weight(buf.ptr, buf.ptr, 64, 64, 7, 0, nullptr); }));
  float* s = reinterpret_cast<float*>(buf.ptr);
  FF_CHECK(refused([&] { ff::pack_weight_fp8(buf.ptr, s, buf.ptr, s, 64, 48, 0, 0, nullptr); }));  // e4m3: 32 columns
  FF_CHECK(refused([&] { ff::unpack_weight_fp8(buf.ptr, s, buf.ptr, 64, 80, 0, 0, nullptr); }));
}

FF_TEST(a_matmul_through_the_weight_ring_matches_the_host_product) {
  constexpr ff::WeightFormat kBf16 = ff::WeightFormat::kBf16, kFp8 = ff::WeightFormat::kFp8;
  FF_CHECK(matmul_error<kBf16>(3, 16, 1) < 1e-5);  // half a stage per row block, activations staged in shared memory
  FF_CHECK(matmul_error<kBf16>(5, 48, 3) < 1e-5);  // one and a half stages per row block
  FF_CHECK(matmul_error<kBf16>(4, 64, 8) < 1e-5);  // two stages per row block, activations read from L2
  FF_CHECK(matmul_error<kBf16>(40, 16, 8) < 1e-5);  // more row blocks than the ring has stages
  // e4m3 (every code but NaN, subnormals included; random row scales): a stage holds 32 k blocks
  FF_CHECK(matmul_error<kFp8>(3, 16, 1) < 1e-5);   // a quarter stage per row block
  FF_CHECK(matmul_error<kFp8>(5, 96, 3) < 1e-5);   // one and a half stages per row block
  FF_CHECK(matmul_error<kFp8>(4, 128, 8) < 1e-5);  // two stages, activations read from L2
  FF_CHECK(matmul_error<kFp8>(40, 32, 8) < 1e-5);  // more row blocks than the ring has stages
}

FF_TEST(attention_merges_chunk_partials_like_the_host) {
  FF_CHECK(merge_error<Tiny>(1, 16, 11, 0) < 1e-2);  // bf16 output: ~4e-3 of rounding
  FF_CHECK(merge_error<Tiny>(8, 66, 66, 1) < 1e-2);
  FF_CHECK(merge_error<TinyD128>(3, 33, 20, 0) < 1e-2);
  FF_CHECK(merge_error<TinyD128>(8, 128, 1, 0) < 1e-2);  // one active chunk
}

int main() {
  if (!flashformer::cuda_available()) {
    std::printf("SKIP: no CUDA device of compute capability 9.0 is visible\n");
    return 77;
  }
  return fftest::run_all();
}
