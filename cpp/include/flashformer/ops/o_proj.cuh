// O projection + residual add: the attention output (B fragments in global memory) times W_o,
// added into the residual stream.
#pragma once

#include "flashformer/op.hpp"
#ifdef __CUDACC__
#include "flashformer/residual.cuh"
#endif

namespace flashformer {

struct OProjOp : OpDefaults {
  static constexpr const char* kName = "o_proj";
  static constexpr int units(const ModelDims& d, int) { return d.hidden / kRowBlock; }
  static constexpr int64_t unit_bytes(const ModelDims& d, const WeightFormats& f) {
    return row_block_bytes(d.q_rows(), f.layers);
  }

#ifdef __CUDACC__
  template <class T>
  __device__ static bool produce(Producer<T>& pr, Task task, int u0, int u1) {
    return stream_row_blocks<T::kWeights>(pr, pr.p.layers[task.layer].o, T::kQRows, u0, u1);
  }
  // Its rows of x feed the MLP's RMSNorm (norm 2 * layer + 1).
  template <class T>
  __device__ static bool consume(Consumer<T>& c, Task task, int u0, int u1) {
    return run_matmul_global_b<T, T::kWeights, ResidualEpilogue<T, 1>>(c, c.p.scratch.attn_frag, T::kQRows / kKBlock,
                                                                      c.p.layers[task.layer].o, task, u0, u1);
  }
#endif
};

}  // namespace flashformer
