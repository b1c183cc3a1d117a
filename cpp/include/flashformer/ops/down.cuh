// Down projection + residual add: silu(gate) * up (B fragments in global memory) times W_down,
// added into the residual stream.
#pragma once

#include "flashformer/op.hpp"
#ifdef __CUDACC__
#include "flashformer/residual.cuh"
#endif

namespace flashformer {

struct DownOp : OpDefaults {
  static constexpr const char* kName = "down";
  static constexpr int units(const ModelDims& d, int) { return d.hidden / kRowBlock; }
  static constexpr int64_t unit_bytes(const ModelDims& d, const WeightFormats& f) {
    return row_block_bytes(d.intermediate, f.layers);
  }

#ifdef __CUDACC__
  template <class T>
  __device__ static bool produce(Producer<T>& pr, Task task, int u0, int u1) {
    return stream_row_blocks<T::kWeights>(pr, pr.p.layers[task.layer].down, T::kIntermediate, u0, u1);
  }
  // Its rows of x feed the next layer's attention RMSNorm, or the final one (norm 2 * layer + 2).
  template <class T>
  __device__ static bool consume(Consumer<T>& c, Task task, int u0, int u1) {
    return run_matmul_global_b<T, T::kWeights, ResidualEpilogue<T, 2>>(c, c.p.scratch.act_frag,
                                                                      T::kIntermediate / kKBlock,
                                                                      c.p.layers[task.layer].down, task, u0, u1);
  }
#endif
};

}  // namespace flashformer
