// RMSNorm + gate|up projection + SiLU(gate) * up. Packed rows put gate row 8j+g and its up row
// in rows g and g+8 of block j, so the product happens in the accumulator registers.
#pragma once

#include "flashformer/ops/gemv.cuh"

namespace flashformer {

template <class T>
struct SiluMulEpilogue {
  Consumer<T>& c;
  __device__ SiluMulEpilogue(Consumer<T>& c_, int) : c(c_) {}
  __device__ void prefetch(int) {}  // reads nothing
  __device__ void row_block(int rb, const AccTile& acc) {
    const int g = c.lane / 4, t = c.lane % 4;
    const int i = rb * 8 + g;  // intermediate index
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int n = 2 * t + q;
      if (n >= c.p.batch) continue;
      const float gate = acc[q], up = acc[2 + q];
      c.p.scratch.act_frag[act_fragment_index(n, i)] = __float2bfloat16(gate / (1.f + __expf(-gate)) * up);
    }
  }
  __device__ void finish() {}
};

template <class T>
struct GateUpOp {
  static constexpr Op kOp = Op::kGateUp;
  __device__ static bool produce(Producer<T>& pr, int layer, int u0, int u1) {
    return stream_row_blocks(pr, pr.p.layers[layer].gate_up, T::kHidden, u0, u1);
  }
  __device__ static bool consume(Consumer<T>& c, int layer, int u0, int u1) {
    return norm_then_matmul<T, SiluMulEpilogue<T>>(c, c.p.layers[layer].mlp_norm, 2 * layer + 1, Op::kOProj, layer,
                                                   layer, u0, u1);
  }
};

}  // namespace flashformer
