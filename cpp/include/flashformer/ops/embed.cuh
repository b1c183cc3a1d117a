// Embedding lookup into the fp32 residual stream; units are 16-wide slices of the hidden vector.
#pragma once

#include "flashformer/ops/context.cuh"

namespace flashformer {

template <class T>
struct EmbedOp {
  static constexpr Op kOp = Op::kEmbed;

  __device__ static bool produce(Producer<T>&, int, int, int) { return true; }  // streams no weights

  __device__ static bool consume(Consumer<T>& c, int /*layer*/, int u0, int u1) {
    const int d0 = u0 * kRowBlock, width = (u1 - u0) * kRowBlock;
    for (int i = c.tid; i < c.p.batch * width; i += kConsumerThreads) {
      const int b = i / width, d = d0 + i % width;
      c.p.scratch.x[b * T::kHidden + d] = __bfloat162float(c.p.embed[c.p.tokens[b] * T::kHidden + d]);
    }
    return true;
  }
};

}  // namespace flashformer
