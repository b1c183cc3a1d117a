// Embedding lookup into the fp32 residual stream; units are 16-wide slices of the hidden vector.
#pragma once

#include "flashformer/ops/context.cuh"
#include "flashformer/ops/rmsnorm.cuh"

namespace flashformer {

template <class T>
struct EmbedOp {
  static constexpr Op kOp = Op::kEmbed;

  __device__ static bool produce(Producer<T>&, int, int, int) { return true; }  // streams no weights

  // Also leaves this SM's sum of squares of its slice per batch row for the first RMSNorm (norm 0).
  __device__ static bool consume(Consumer<T>& c, int /*layer*/, int u0, int u1) {
    const int d0 = u0 * kRowBlock, width = (u1 - u0) * kRowBlock;
    float* partial = c.reduce;  // (warps, kMaxBatch): free between row blocks
    for (int b = 0; b < c.p.batch; ++b) {
      float sq = 0.f;
      for (int i = c.tid; i < width; i += kConsumerThreads) {
        const float v = __bfloat162float(c.p.embed[c.p.tokens[b] * T::kHidden + d0 + i]);
        c.p.scratch.x[b * T::kHidden + d0 + i] = v;
        sq += v * v;
      }
#pragma unroll
      for (int off = kWarpSize / 2; off > 0; off /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, off);
      if (c.lane == 0) partial[c.warp * kMaxBatch + b] = sq;
    }
    c.sync();  // every warp's partial is in shared memory
    if (c.tid < c.p.batch) {
      float s = 0.f;
      for (int w = 0; w < kConsumerWarps; ++w) s += partial[w * kMaxBatch + c.tid];
      sq_part_of(c.p, 0)[blockIdx.x * kMaxBatch + c.tid] = s;
    }
    return true;
  }
};

}  // namespace flashformer
