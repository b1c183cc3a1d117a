// Elementwise kernels of the megakernel backend's prefill (the reference decoder over unpacked
// layers): each fuses what the reference writes as a chain of torch ops, with the same roundings
// to bf16 at the same places, so it is the reference's arithmetic in fewer passes over memory.
#include <cuda_bf16.h>

#include <stdexcept>

#include "cuda_check.hpp"
#include "kernels/launch.hpp"

namespace flashformer {
namespace {

constexpr int kThreads = 256;

__device__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16(v)); }

// One CTA per row: y = weight * bf16(x * rsqrt(mean(x^2) + eps)), the product rounded to bf16
// (reference.rms_norm: the scale in fp32, cast back, then the multiply in bf16).
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const __nv_bfloat16* __restrict__ x,
                                                            const __nv_bfloat16* __restrict__ weight,
                                                            __nv_bfloat16* __restrict__ y, int n, float eps) {
  const __nv_bfloat16* row = x + int64_t(blockIdx.x) * n;
  float sq = 0.f;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float v = __bfloat162float(row[i]);
    sq += v * v;
  }
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sq;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  const float scale = rsqrtf(total / n + eps);
  __nv_bfloat16* out = y + int64_t(blockIdx.x) * n;
  for (int i = threadIdx.x; i < n; i += kThreads)
    out[i] = __float2bfloat16(__bfloat162float(weight[i]) * bf16_round(__bfloat162float(row[i]) * scale));
}

// out[r, j] = bf16(bf16(silu(gate[r, j])) * up[r, j]) for gate_up rows [gate (inter) | up (inter)]
// (reference: F.silu(gate) * up, each op rounding to bf16).
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(const __nv_bfloat162* __restrict__ gate_up,
                                                            __nv_bfloat162* __restrict__ out, int64_t rows,
                                                            int half_pairs) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= rows * half_pairs) return;
  const int64_t r = i / half_pairs, j = i % half_pairs;
  const float2 g = __bfloat1622float2(gate_up[r * 2 * half_pairs + j]);
  const float2 u = __bfloat1622float2(gate_up[r * 2 * half_pairs + half_pairs + j]);
  const float sx = bf16_round(g.x / (1.f + expf(-g.x))), sy = bf16_round(g.y / (1.f + expf(-g.y)));
  out[i] = __floats2bfloat162_rn(sx * u.x, sy * u.y);
}

}  // namespace

void rms_norm_rows(const void* x, const void* weight, void* y, int64_t rows, int64_t n, float eps,
                   cudaStream_t stream) {
  if (rows < 1 || n < 1) throw std::invalid_argument("rms_norm_rows: rows and n must be >= 1");
  if (rows > int64_t(1) << 31 || n > int64_t(1) << 30) throw std::invalid_argument("rms_norm_rows: too large");
  rms_norm_kernel<<<unsigned(rows), kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x),
                                                           static_cast<const __nv_bfloat16*>(weight),
                                                           static_cast<__nv_bfloat16*>(y), int(n), eps);
  FF_CUDA_CHECK(cudaGetLastError());
}

void silu_mul_rows(const void* gate_up, void* out, int64_t rows, int64_t intermediate, cudaStream_t stream) {
  if (rows < 1 || intermediate < 2 || intermediate % 2 != 0)
    throw std::invalid_argument("silu_mul_rows: rows must be >= 1 and the intermediate size even");
  const int64_t n = rows * intermediate / 2;
  silu_mul_kernel<<<unsigned((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      static_cast<const __nv_bfloat162*>(gate_up), static_cast<__nv_bfloat162*>(out), rows, int(intermediate / 2));
  FF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashformer
