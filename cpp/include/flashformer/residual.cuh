// The epilogue of the O and down projections: the matmul's rows added into the fp32 residual
// stream (each row is owned by exactly one CTA), with the sums of squares the next RMSNorm needs.
// In a tensor-parallel shard (T::kWorld > 1) the rows are this rank's partial sums: they go to
// every rank's exchange buffer (megakernel_params.hpp's TensorParallel), and each rank adds the
// ranks' partials in rank order, so every rank writes the same residual, bit for bit.
#pragma once

#include "flashformer/gemv.cuh"

namespace flashformer {

// kNorm: the RMSNorm that reads the rows this op writes is norm 2 * layer + kNorm (rmsnorm.cuh);
// also the exchange set (kNorm - 1: the O projection's, then the down projection's).
template <class T, int kNorm>
struct ResidualEpilogue {
  static constexpr int kWorld = T::kWorld;
  static constexpr int kSet = kNorm - 1;
  Consumer<T>& c;
  const Task& task;
  int norm;
  float old[4];            // the residual of the row block's (row, batch) pairs, acc order
  float sq[2] = {0.f, 0.f};  // sum of squares of the new rows, batch columns 2t and 2t+1
  int first_rb = 0, end_rb = 0;  // kWorld > 1: the row blocks this CTA wrote partials of
  __device__ ResidualEpilogue(Consumer<T>& c_, const Task& task_) : c(c_), task(task_), norm(2 * task_.layer + kNorm) {}
  __device__ float* x_of(int rb, int q) const {
    const int g = c.lane / 4, t = c.lane % 4;
    return c.p.scratch.x + int64_t(2 * t + q) * T::kHidden + rb * kRowBlock + g;
  }
  // Rows of x are owned by one CTA per op, so reading them before the row block is safe; they
  // were written by other CTAs earlier in the step: read through L2.
  __device__ void load_old(int rb) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
      if (2 * (c.lane % 4) + q < c.p.batch) old[q] = __ldcg(x_of(rb, q)), old[2 + q] = __ldcg(x_of(rb, q) + 8);
  }
  __device__ void prefetch(int rb) {
    if constexpr (kWorld == 1) load_old(rb);  // (a shard's are read once the ranks' sums are in)
  }
  // x += acc for the lane's (row, batch) pairs; their squares into sq.
  __device__ void add(int rb, const AccTile& acc) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (2 * (c.lane % 4) + q >= c.p.batch) continue;
      float* x = x_of(rb, q);
      const float lo = old[q] + acc[q], hi = old[2 + q] + acc[2 + q];
      x[0] = lo, x[8] = hi;
      sq[q] += lo * lo + hi * hi;
    }
  }
  __device__ void row_block(int rb, const AccTile& acc) {
    if constexpr (kWorld == 1) {
      add(rb, acc);
    } else {
      if (end_rb == first_rb) first_rb = rb;
      end_rb = rb + 1;
      const float4 v = make_float4(acc[0], acc[1], acc[2], acc[3]);
#pragma unroll
      for (int q = 0; q < kWorld; ++q) *partial(q, c.p.tp.rank, rb) = v;  // (peers' through NVLink)
    }
  }
  // Rank `src`'s tile of row block rb in rank `owner`'s exchange buffer: this lane's float4.
  __device__ float4* partial(int owner, int src, int rb) const {
    return reinterpret_cast<float4*>(c.p.tp.partial[owner]) +
           ((int64_t(kSet) * kWorld + src) * (T::kHidden / kRowBlock) + rb) * kWarpSize + c.lane;
  }
  // Warp 0, kWorld > 1: tell every rank this CTA's partials are there, wait for theirs, and sum.
  __device__ bool exchange() {
    const TensorParallel& tp = c.p.tp;
    const unsigned count = (c.p.epoch - 1) * unsigned(c.p.n_layers) + unsigned(task.layer) + 1;
    const int me = int(blockIdx.x);
    __syncwarp();  // the warp's partials are written (and ordered before lane 0's fence)
    if (c.lane == 0) {
      fence_acq_rel_sys();  // cumulative: the partials before the ready words, on every GPU
      for (int q = 0; q < kWorld; ++q)
        if (q != tp.rank) store_release_sys(tp.ready[q] + (kSet * kWorld + tp.rank) * gridDim.x + me, count);
    }
    bool ok = true;
    if (c.lane < kWorld && c.lane != tp.rank)  // lane q waits for rank q's SM `me`
      ok = wait_peer(tp.ready[tp.rank] + (kSet * kWorld + c.lane) * gridDim.x + me, count, c.p, task.index, c.lane);
    __syncwarp();         // orders the waiting lanes' acquires before every lane's reads
    fence_acq_rel_sys();  // (and makes them this lane's: it reads other GPUs' writes)
    if (!__all_sync(0xffffffffu, ok)) return false;
    for (int rb = first_rb; rb < end_rb; ++rb) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int q = 0; q < kWorld; ++q) {  // in rank order on every rank: the same sums everywhere
        const float4 v = __ldcg(partial(tp.rank, q, rb));
        acc[0] += v.x, acc[1] += v.y, acc[2] += v.z, acc[3] += v.w;
      }
      load_old(rb);
      add(rb, acc);
    }
    return true;
  }
  // (An exchange that gave up has raised the step's error: the rest of the step sees it at its
  // next wait and leaves, and the engine reports the lost rank.)
  __device__ void finish() {
    if (c.warp != 0) return;
    if constexpr (kWorld > 1)
      if (!exchange()) return;
    publish_sq_part(c.p, norm, c.lane, sq);
  }
};

}  // namespace flashformer
