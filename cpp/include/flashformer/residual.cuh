// The epilogue of the O and down projections: the matmul's rows added into the fp32 residual
// stream (each row is owned by exactly one CTA), with the sums of squares the next RMSNorm needs.
#pragma once

#include "flashformer/gemv.cuh"

namespace flashformer {

// kNorm: the RMSNorm that reads the rows this op writes is norm 2 * layer + kNorm (rmsnorm.cuh).
template <class T, int kNorm>
struct ResidualEpilogue {
  Consumer<T>& c;
  int norm;
  float old[4];            // the residual of the row block's (row, batch) pairs, acc order
  float sq[2] = {0.f, 0.f};  // sum of squares of the new rows, batch columns 2t and 2t+1
  __device__ ResidualEpilogue(Consumer<T>& c_, int layer) : c(c_), norm(2 * layer + kNorm) {}
  __device__ float* x_of(int rb, int q) const {
    const int g = c.lane / 4, t = c.lane % 4;
    return c.p.scratch.x + int64_t(2 * t + q) * T::kHidden + rb * kRowBlock + g;
  }
  // Rows of x are owned by one CTA per op, so reading them before the row block is safe; they
  // were written by other CTAs earlier in the step: read through L2.
  __device__ void prefetch(int rb) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
      if (2 * (c.lane % 4) + q < c.p.batch) old[q] = __ldcg(x_of(rb, q)), old[2 + q] = __ldcg(x_of(rb, q) + 8);
  }
  __device__ void row_block(int rb, const AccTile& acc) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (2 * (c.lane % 4) + q >= c.p.batch) continue;
      float* x = x_of(rb, q);
      const float lo = old[q] + acc[q], hi = old[2 + q] + acc[2 + q];
      x[0] = lo, x[8] = hi;
      sq[q] += lo * lo + hi * hi;
    }
  }
  __device__ void finish() {
    if (c.warp == 0) publish_sq_part(c.p, norm, c.lane, sq);
  }
};

}  // namespace flashformer
