// O projection and down projection: matmul on activations another op wrote to global memory,
// added into the fp32 residual stream (each row is owned by exactly one CTA).
#pragma once

#include "flashformer/ops/gemv.cuh"

namespace flashformer {

template <class T>
struct ResidualEpilogue {
  Consumer<T>& c;
  __device__ ResidualEpilogue(Consumer<T>& c_, int) : c(c_) {}
  __device__ void row_block(int rb, const AccTile& acc) {
    const int g = c.lane / 4, t = c.lane % 4;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int n = 2 * t + q;
      if (n >= c.p.batch) continue;
      float* x = c.p.scratch.x + int64_t(n) * T::kHidden + rb * kRowBlock + g;
      x[0] = __ldcg(x) + acc[q];  // written by another CTA earlier in the step: read through L2
      x[8] = __ldcg(x + 8) + acc[2 + q];
    }
  }
  __device__ void finish() {}
};

template <class T>
struct OProjOp {
  static constexpr Op kOp = Op::kOProj;
  __device__ static bool produce(Producer<T>& pr, int layer, int u0, int u1) {
    return stream_row_blocks(pr, pr.p.layers[layer].o, T::kQRows, u0, u1);
  }
  __device__ static bool consume(Consumer<T>& c, int layer, int u0, int u1) {
    return run_matmul_global_b<T, ResidualEpilogue<T>>(c, c.p.scratch.attn_frag, T::kQRows / kKBlock, layer, u0, u1);
  }
};

template <class T>
struct DownOp {
  static constexpr Op kOp = Op::kDown;
  __device__ static bool produce(Producer<T>& pr, int layer, int u0, int u1) {
    return stream_row_blocks(pr, pr.p.layers[layer].down, T::kIntermediate, u0, u1);
  }
  __device__ static bool consume(Consumer<T>& c, int layer, int u0, int u1) {
    return run_matmul_global_b<T, ResidualEpilogue<T>>(c, c.p.scratch.act_frag, T::kIntermediate / kKBlock, layer, u0,
                                                         u1);
  }
};

}  // namespace flashformer
