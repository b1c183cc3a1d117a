// Embedding lookup into the fp32 residual stream; units are 16-wide slices of the hidden vector.
#pragma once

#include "flashformer/op.hpp"
#ifdef __CUDACC__
#include "flashformer/context.cuh"
#include "flashformer/fragment_layout.hpp"
#include "flashformer/rmsnorm.cuh"
#endif

namespace flashformer {

struct EmbedOp : OpDefaults {
  static constexpr const char* kName = "embed";
  static constexpr Scope kScope = Scope::kOnceFirst;
  static constexpr bool kWaits = false;  // the step's first task: it reads only the input tokens
  static constexpr int units(const ModelDims& d, int) { return d.hidden / kRowBlock; }

#ifdef __CUDACC__
  template <class T>
  __device__ static bool produce(Producer<T>&, Task, int, int) { return true; }  // streams no weights

  // Element (token, col) of the table: row-major, or a tied table that is the packed LM head.
  __device__ static int64_t table_index(const MegakernelParams& p, int64_t token, int col, int hidden) {
    return p.embed_packed ? weight_fragment_index(token, col, hidden) : token * hidden + col;
  }

  // Also leaves this SM's sum of squares of its slice per batch row for the first RMSNorm (norm 0).
  template <class T>
  __device__ static bool consume(Consumer<T>& c, Task, int u0, int u1) {
    const int d0 = u0 * kRowBlock, width = (u1 - u0) * kRowBlock;
    float* partial = c.reduce;  // (warps, kMaxBatch): free between row blocks
    for (int b = 0; b < c.p.batch; ++b) {
      float sq = 0.f;
      for (int i = c.tid; i < width; i += kConsumerThreads) {
        const float v = __bfloat162float(c.p.embed[table_index(c.p, c.p.tokens[b], d0 + i, T::kHidden)]);
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
#endif
};

}  // namespace flashformer
