// O projection and down projection: matmul on activations another op wrote to global memory,
// added into the fp32 residual stream (each row is owned by exactly one CTA).
#pragma once

#include "flashformer/ops/gemv.cuh"

namespace flashformer {

// kOp: the op (kOProj or kDown) whose epilogue this is. The RMSNorm that reads the rows it
// writes is norm 2 * layer + 1 (after O) or 2 * layer + 2 (after down): rmsnorm.cuh. x is tagged
// (tagged.cuh): the rows are written with kOp's tag, and the old rows are checked for the tag of
// the op that wrote them before (always there already: every op between waited for them).
template <class T, Op kOp>
struct ResidualEpilogue {
  static_assert(kOp == Op::kOProj || kOp == Op::kDown, "the residual stream is added to after O and after down");
  Consumer<T>& c;
  int layer, norm;
  uint32_t tag, old_tag;     // this write's tag, the previous write's
  uint64_t old[4];           // the residual of the row block's (row, batch) pairs, acc order
  float sq[2] = {0.f, 0.f};  // sum of squares of the new rows, batch columns 2t and 2t+1
  __device__ ResidualEpilogue(Consumer<T>& c_, int layer_)
      : c(c_), layer(layer_), norm(2 * layer_ + (kOp == Op::kOProj ? 1 : 2)), tag(write_tag(c_.p, kOp, layer_)) {
    // x before O was written by the layer's qkv input's writer; before down, by O.
    const Dependency before = kOp == Op::kOProj ? dependency_at(Op::kQkv, layer_) : Dependency{Op::kOProj, layer_};
    old_tag = write_tag(c_.p, before.op, before.layer);
  }
  __device__ uint64_t* x_of(int rb, int q) const {
    const int g = c.lane / 4, t = c.lane % 4;
    return c.p.scratch.x + int64_t(2 * t + q) * T::kHidden + rb * kRowBlock + g;
  }
  // Rows of x are owned by one CTA per op, so reading them before the row block is safe.
  __device__ void prefetch(int rb) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
      if (2 * (c.lane % 4) + q < c.p.batch) old[q] = load_tagged(x_of(rb, q)), old[2 + q] = load_tagged(x_of(rb, q) + 8);
  }
  __device__ void row_block(int rb, const AccTile& acc) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (2 * (c.lane % 4) + q >= c.p.batch) continue;
      uint64_t* x = x_of(rb, q);
      poll_tagged(
          [&] {
            if (tag_of(old[q]) != old_tag) old[q] = load_tagged(x);
            if (tag_of(old[2 + q]) != old_tag) old[2 + q] = load_tagged(x + 8);
            return tag_of(old[q]) == old_tag && tag_of(old[2 + q]) == old_tag;
          },
          c.p, kOp, layer);
      const float lo = value_of(old[q]) + acc[q], hi = value_of(old[2 + q]) + acc[2 + q];
      store_tagged(x, tagged(lo, tag));
      store_tagged(x + 8, tagged(hi, tag));
      sq[q] += lo * lo + hi * hi;
    }
  }
  __device__ void finish() {
    if (c.warp == 0) publish_sq_part(c.p, norm, tag, c.lane, sq);
  }
};

template <class T>
struct OProjOp {
  static constexpr Op kOp = Op::kOProj;
  __device__ static bool produce(Producer<T>& pr, int layer, int u0, int u1) {
    return stream_row_blocks(pr, pr.p.layers[layer].o, T::kQRows, u0, u1);
  }
  __device__ static bool consume(Consumer<T>& c, int layer, int u0, int u1) {
    return run_matmul_global_b<T, ResidualEpilogue<T, kOp>>(c, c.p.scratch.attn_frag, T::kQRows / kKBlock, layer, u0, u1);
  }
};

template <class T>
struct DownOp {
  static constexpr Op kOp = Op::kDown;
  __device__ static bool produce(Producer<T>& pr, int layer, int u0, int u1) {
    return stream_row_blocks(pr, pr.p.layers[layer].down, T::kIntermediate, u0, u1);
  }
  __device__ static bool consume(Consumer<T>& c, int layer, int u0, int u1) {
    return run_matmul_global_b<T, ResidualEpilogue<T, kOp>>(c, c.p.scratch.act_frag, T::kIntermediate / kKBlock, layer, u0,
                                                         u1);
  }
};

}  // namespace flashformer
