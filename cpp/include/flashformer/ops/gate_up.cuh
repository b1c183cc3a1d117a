// RMSNorm + gate|up projection + SiLU(gate) * up. Packed rows put gate row 8j+g and its up row
// in rows g and g+8 of block j, so the product happens in the accumulator registers.
#pragma once

#include "flashformer/op.hpp"
#ifdef __CUDACC__
#include "flashformer/gemv.cuh"
#endif

namespace flashformer {

#ifdef __CUDACC__
template <class T>
struct SiluMulEpilogue {
  Consumer<T>& c;
  __device__ SiluMulEpilogue(Consumer<T>& c_, const Task&) : c(c_) {}
  __device__ void prefetch(int) {}  // reads nothing
  __device__ void row_block(int rb, const AccTile& acc) {
    const int g = c.lane / 4, t = c.lane % 4;
    const int i = rb * 8 + g;  // intermediate index
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int n = 2 * t + q;
      if (n >= c.p.batch) continue;
      const float gate = acc[q], up = acc[2 + q];
      reinterpret_cast<uint16_t*>(c.p.scratch.act_frag)[act_index<T::kWeights>(n, i)] =  // (the down projection's)
          Activations<T::kWeights>::one(gate / (1.f + __expf(-gate)) * up);
    }
  }
  __device__ void finish() {}
};

#endif

struct GateUpOp : OpDefaults {
  static constexpr const char* kName = "gate_up";
  static constexpr int units(const ModelDims& d, int) { return 2 * d.intermediate / kRowBlock; }
  static constexpr int64_t unit_bytes(const ModelDims& d, const WeightFormats& f) { return row_block_bytes(d.hidden, f.layers); }

#ifdef __CUDACC__
  template <class T>
  __device__ static bool produce(Producer<T>& pr, Task task, int u0, int u1) {
    return stream_row_blocks<T::kWeights>(pr, pr.p.layers[task.layer].gate_up, T::kHidden, u0, u1);
  }
  // x's rows were written by the task before (the O projection)
  template <class T>
  __device__ static bool consume(Consumer<T>& c, Task task, int u0, int u1) {
    const LayerWeights& w = c.p.layers[task.layer];
    return norm_then_matmul<T, T::kWeights, SiluMulEpilogue<T>>(c, w.mlp_norm, 2 * task.layer + 1, w.gate_up, task, u0,
                                                                u1);
  }
#endif
};

}  // namespace flashformer
